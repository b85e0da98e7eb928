"""Guarantee 11 over HTTP, by property-based fuzzing: every operation of
`/openapi.json` (schemathesis: its examples, coverage and fuzzing phases, valid
and invalid data) against a real uvicorn with a worker and a projector, on real
Redis and Postgres. Every answer must be a precise 4xx in Eddy's error shape or a
success, never a 5xx and never a dropped connection; afterwards the system must
still serve (`test_bad_input.still_serving`: a new command processed and
queryable, no command that crashed its handler, nothing pending, every
projection caught up with its streams, no dead letters).

How it runs: the stack lives in a thread of its own (an anyio blocking portal),
one per module, so the synchronous schemathesis tests can call it; the last test
of the module checks the stack after every operation was fuzzed (pytest keeps a
module's tests in file order).

Checks (schemathesis's, plus ours in `check_answer`): the status is documented for
the operation, the body matches its documented schema and content type (so every
4xx carries `{"error": {"code", "message"}}`), invalid data is refused
(`negative_data_rejection`, 413 included), a request without a token or with a
bad one gets 401 (`ignored_auth`), an undocumented method gets 405. Not checked:
`positive_data_acceptance` (data the schema allows may still break a rule it
cannot say: a NUL character, nesting over 32 levels, `ended_at` before
`started_at`, an `after` position or a `cursor` Eddy did not issue, a `wait` over
`EDDY_MAX_WAIT_S`, an unknown id: 4xx on purpose) and `allow_header_conformance`:
a 405 on `/v1/commands/CreateChatSession` rightly allows GET as well (the status of
a command whose id is `CreateChatSession`), which the document lists under
`/v1/commands/{command_id}`, a path schemathesis does not match to it
(`tests/integration/test_http.py` checks `Allow` itself).

Schemathesis generates from the document, so it never sends what the document
does not name; the hypothesis tests after it do: the filters each query reads
(`agent_id`, `status`, `active`, `session_id`), any character in a path segment,
digits that are not ASCII, cursors holding any JSON, times at the ends of the
range with any offset, bytes that are not UTF-8 inside a body.

The SSE route streams forever, so schemathesis leaves it out; `test_sse_fuzz`
fuzzes its topics and resume tokens with hypothesis instead.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any
from urllib.parse import quote

import httpx
import hypothesis
import msgspec
import pytest
import requests
import schemathesis
from anyio.from_thread import BlockingPortal
from hypothesis import HealthCheck, given
from hypothesis import strategies as st
from schemathesis.checks import CHECKS
from schemathesis.generation import GenerationMode

from app.openapi import openapi
from app.registry import SYSTEM
from core.settings import Settings
from tests.conftest import fresh_settings
from tests.faults.test_bad_input import serving_in_a_thread, still_serving
from tests.stack import Stack

pytestmark = [
    pytest.mark.slow,
    # The stack runs in another thread of this process and uses `random` (backoff
    # jitter); hypothesis sees the global state move while it draws and blames the
    # strategies.
    pytest.mark.filterwarnings(
        "ignore:Do not use the `random` module inside strategies"
        ":hypothesis.errors.HypothesisDeprecationWarning"
    ),
]

EXAMPLES = 10
"""Fuzzed cases per operation and generation mode, on top of the coverage phase's."""
TIMEOUT_S = 10

SCHEMA = schemathesis.openapi.from_dict(openapi(SYSTEM)).exclude(operation_id="StreamEvents")
SCHEMA.config.generation.update(
    modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE],
    max_examples=EXAMPLES,
    database="none",
    # a valid token rides on every case; `ignored_auth` tries none and bad ones
    with_security_parameters=False,
    # unknown query parameters are ignored, as HTTP APIs do, not refused
    allow_extra_parameters=False,
)
SCHEMA.config.phases.update(phases=["examples", "coverage", "fuzzing"])
_rejection = SCHEMA.config.checks.negative_data_rejection
_rejection.expected_statuses = [*_rejection.expected_statuses, "413"]  # a body over the limit
CHECKED = [
    CHECKS.get_one(name)
    for name in (
        "status_code_conformance",
        "content_type_conformance",
        "response_schema_conformance",
        "response_headers_conformance",
        "negative_data_rejection",
        "ignored_auth",
        "unsupported_method",
    )
]
SETTINGS = hypothesis.settings(
    database=None,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    print_blob=True,
)


@dataclass
class Served:
    """The module's stack, its event loop's portal, and what the fuzzing left."""

    stack: Stack
    portal: BlockingPortal
    token: str
    accepted: list[str] = field(default_factory=list)
    """Ids of the commands the fuzzing got accepted (200 or 202)."""
    session: requests.Session = field(default_factory=requests.Session)

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


def fuzz_settings(settings: Settings) -> Settings:
    # `?after=` positions that parse but are never reached answer 504 after this long
    return msgspec.structs.replace(settings, after_timeout_s=0.2, max_wait_s=2.0)


@pytest.fixture(scope="module")
def served(redis_url: str, database_url: str) -> Iterator[Served]:
    settings = fuzz_settings(fresh_settings(redis_url, database_url))
    with serving_in_a_thread(settings) as (stack, portal):
        served = Served(stack, portal, stack.token())
        with served.session:
            yield served


def check_answer(response: Any, sent: object) -> None:
    """A success or a precise 4xx in Eddy's error shape; never a 5xx, but 504 `stale`,
    the documented answer to an `after` not reached in time. `response`: from
    schemathesis, requests or httpx; `sent`: what to show when it fails."""
    status = response.status_code
    assert status < 500 or status == 504, (sent, status, response.text)
    if status >= 400:
        error = response.json()["error"]
        assert error["code"] and error["message"], (sent, status, response.text)
        assert status != 504 or error["code"] == "stale", (sent, response.text)


@SCHEMA.parametrize()
@SETTINGS
def test_every_operation_answers_bad_input_with_a_precise_4xx(case: Any, served: Served) -> None:
    headers = {"Authorization": f"Bearer {served.token}"}
    response = case.call(
        base_url=served.stack.url, session=served.session, headers=headers, timeout=TIMEOUT_S
    )
    check_answer(response, case.as_curl_command())
    if case.method == "POST" and response.status_code in (200, 202):
        served.accepted.append(response.json()["command_id"])
    case.validate_response(
        response,
        checks=CHECKED,
        headers=headers,
        transport_kwargs={"base_url": served.stack.url, "session": served.session},
    )


# -- what schemathesis does not reach: undocumented filters, any character in a path
# segment, digits that are not ASCII, cursors and times at the edges, bytes that are not UTF-8

ROUTES = [q.path for p in SYSTEM.projections for q in p.queries] + ["/v1/commands/{command_id}"]
ANY_TEXT = st.text(max_size=40)
DIGITISH = st.text(
    st.characters(categories=["Nd", "No", "Zs"]) | st.sampled_from("0159-+.e"), max_size=6
)
OFFSETS = st.builds(
    timezone, st.integers(-23 * 60 - 59, 23 * 60 + 59).map(lambda m: timedelta(minutes=m))
)
FIRST_DAY, LAST_DAY = datetime(1, 1, 2), datetime(9999, 12, 30)
MOMENTS = st.one_of(
    st.datetimes(timezones=OFFSETS),
    # a day from either end of the range, where an offset can push it out of UTC's
    st.datetimes(max_value=FIRST_DAY, timezones=OFFSETS),
    st.datetimes(min_value=LAST_DAY, timezones=OFFSETS),
)
CURSORS = st.lists(
    st.one_of(ANY_TEXT, st.integers(), MOMENTS.map(datetime.isoformat), st.none()), max_size=3
).map(lambda values: base64.urlsafe_b64encode(json.dumps(values).encode()).decode().rstrip("="))
POSITIONS = st.builds(
    "{}.{}.{}-{}".format,
    st.sampled_from(["chat_sessions", "traces", "tools", "nope", ""]),
    # shards and entry ids in and beyond what Redis and Postgres take
    st.integers(0, 5),
    st.integers(0, 2**64),
    st.integers(0, 2**64),
)
FILTERS = {
    "limit": st.integers(-1, 600).map(str) | DIGITISH | ANY_TEXT,
    "cursor": CURSORS | ANY_TEXT,
    "after": POSITIONS | ANY_TEXT,
    "agent_id": ANY_TEXT,
    "session_id": ANY_TEXT,
    "status": st.sampled_from(["active", "closed", "archived", "all"]) | ANY_TEXT,
    "active": st.sampled_from(["true", "false", "all"]) | ANY_TEXT,
}


@hypothesis.settings(SETTINGS, max_examples=150)
@given(
    route=st.sampled_from(ROUTES),
    ids=st.lists(ANY_TEXT, min_size=3, max_size=3),
    params=st.fixed_dictionaries({}, optional=FILTERS),
)
def test_query_routes_fuzz(
    served: Served, route: str, ids: list[str], params: dict[str, str]
) -> None:
    """Every query route, any path segment (percent-encoded, NUL included), any of the
    parameters a query reads: a success or a precise 4xx."""
    names = [part.strip("{}") for part in route.split("/") if part.startswith("{")]
    path = route.format(**{n: quote(i, safe="") or "x" for n, i in zip(names, ids, strict=False)})
    response = served.session.get(
        served.stack.url + path, params=params, headers=served.auth, timeout=TIMEOUT_S
    )
    check_answer(response, (path, params))


VALID = {
    "CreateChatSession": {
        "agent_id": "fuzz",
        "participants": [{"participant_id": "u", "role": "user"}],
    },
    "AppendTraceSpan": {
        "trace_id": "t",
        "span_id": "s",
        "name": "n",
        "started_at": "2026-01-01T00:00:00Z",
    },
    "UpdateRuntimeConfig": {"module": "m", "settings": {"k": "v"}},
}


@hypothesis.settings(SETTINGS, max_examples=100)
@given(
    name=st.sampled_from(sorted(VALID)),
    at=st.integers(0, 400),
    garbage=st.binary(min_size=1, max_size=4),
    replace=st.booleans(),
)
def test_raw_bodies_fuzz(served: Served, name: str, at: int, garbage: bytes, replace: bool) -> None:
    """A valid body with a few bytes put in or over it (often inside a string, often
    not UTF-8): 2xx, 400 or 422, nothing else."""
    body = json.dumps(VALID[name]).encode()
    at %= len(body)
    body = body[:at] + garbage + body[at + (len(garbage) if replace else 0) :]
    response = served.session.post(
        f"{served.stack.url}/v1/commands/{name}", data=body, headers=served.auth, timeout=TIMEOUT_S
    )
    check_answer(response, body)
    assert response.status_code in (202, 400, 422), (body, response.text)
    if response.status_code == 202:
        served.accepted.append(response.json()["command_id"])


@hypothesis.settings(SETTINGS, max_examples=60)
@given(started=MOMENTS, ended=st.none() | MOMENTS, trace=st.uuids())
def test_span_times_fuzz(
    served: Served, started: datetime, ended: datetime | None, trace: Any
) -> None:
    """Any time with any offset: refused (422) or applied; never a crashed handler
    (`still_serving` looks at every accepted command's outcome)."""
    span = {"trace_id": str(trace), "span_id": "s", "name": "n", "started_at": started.isoformat()}
    if ended is not None:
        span["ended_at"] = ended.isoformat()
    response = served.session.post(
        f"{served.stack.url}/v1/commands/AppendTraceSpan",
        json=span,
        headers=served.auth,
        timeout=TIMEOUT_S,
    )
    check_answer(response, span)
    assert response.status_code in (202, 422), (span, response.text)
    if response.status_code == 202:
        served.accepted.append(response.json()["command_id"])


TOPICS = st.one_of(
    st.sampled_from(["*", "traces", "chat_sessions/s1", "session/s1", "nope", "", "/", "session/"]),
    st.text(max_size=300),
)
TOKENS = st.one_of(
    st.none(),
    st.text(max_size=200),
    st.from_regex(r"\A2~(chat_sessions|traces|nope)(\.[0-9a-z_]{0,30}){0,5}\Z"),
)


@hypothesis.settings(SETTINGS, max_examples=60)
@given(topics=st.lists(TOPICS, max_size=40), since=TOKENS, header=st.booleans())
def test_sse_fuzz(served: Served, topics: list[str], since: str | None, header: bool) -> None:
    """Any topics and resume token: 200 with a first `id:` frame, or a 400 in the
    error shape; never a 5xx, never a dropped connection."""
    params: dict[str, Any] = {"topic": topics, "access_token": served.token}
    headers = {}
    if since is not None:
        if header and since.isascii() and since.isprintable():
            headers["Last-Event-ID"] = since
        else:
            params["last_event_id"] = since
    with (
        httpx.Client(base_url=served.stack.url, timeout=TIMEOUT_S) as client,
        client.stream("GET", "/v1/events/stream", params=params, headers=headers) as response,
    ):
        if response.status_code == 200:
            first = next(response.iter_raw())
            assert first.startswith(b"id: 2~"), first
        else:
            response.read()
            assert response.status_code in (400, 401), response.text
            error = response.json()["error"]
            assert error["code"] in ("bad_request", "bad_position"), error


def test_the_served_document_is_the_fuzzed_one(served: Served) -> None:
    answer = served.session.get(f"{served.stack.url}/openapi.json", timeout=TIMEOUT_S)
    assert answer.status_code == 200
    assert answer.json() == openapi(SYSTEM)


def test_after_fuzzing_the_system_still_works(served: Served) -> None:
    """Last in the module: after every operation was fuzzed."""
    assert served.accepted, "the fuzzing got no command accepted: it reached no handler"
    served.portal.call(still_serving, served.stack, served.accepted)
