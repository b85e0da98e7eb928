"""The runtime-config context's rules, pure: no Redis, no Postgres."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import msgspec
import pytest

from app.contexts.runtime_config import (
    CONTEXT,
    DEFAULTS,
    MAX_FLAGS,
    Changes,
    KeyChanges,
    ResetRuntimeConfig,
    RuntimeConfig,
    RuntimeConfigReset,
    RuntimeConfigUpdated,
    RuntimeFlagUpdated,
    SetRuntimeFlag,
    UpdateRuntimeConfig,
    decide,
    diff,
    evolve,
)
from core.errors import Rejected
from core.messages import DEFAULT_ROLES, Issued

ISSUED = Issued(command_id="c1", tenant_id="t", actor="u", roles=("user",), now=datetime.now(UTC))


def run(state: RuntimeConfig | None, command: Any) -> tuple[RuntimeConfig | None, list[Any]]:
    events = decide(state, command, ISSUED)
    for event in events:
        state = evolve(state, event)
    return state, events


def rejected(state: RuntimeConfig | None, command: Any) -> str:
    with pytest.raises(Rejected) as info:
        decide(state, command, ISSUED)
    return info.value.code


def configured(module: str = "plugins") -> RuntimeConfig:
    state, _ = run(None, UpdateRuntimeConfig(module=module, settings={"a": 1, "b": "x"}))
    assert state is not None
    return state


def test_a_first_flag_starts_from_no_defaults_for_an_undeclared_module() -> None:
    state, events = run(None, SetRuntimeFlag(module="plugins", flag="beta", enabled=True))
    (event,) = events
    assert isinstance(event, RuntimeFlagUpdated)
    assert event.previous is None and event.enabled is True
    assert event.settings == {} and event.flags == {"beta": True}
    assert event.changes == Changes(flags=KeyChanges(added=["beta"]))
    assert state == RuntimeConfig(settings={}, flags={"beta": True})


def test_a_first_command_on_a_declared_module_starts_from_its_defaults() -> None:
    chat = DEFAULTS["chat"]
    state, events = run(None, SetRuntimeFlag(module="chat", flag="streaming", enabled=False))
    (event,) = events
    assert isinstance(event, RuntimeFlagUpdated)
    assert event.previous is True
    assert event.settings == dict(chat.settings)
    assert event.flags == {**chat.flags, "streaming": False}
    assert event.changes == Changes(flags=KeyChanges(changed=["streaming"]))
    assert state is not None and state.settings == dict(chat.settings)


def test_the_first_command_is_recorded_even_if_it_keeps_the_defaults() -> None:
    state, events = run(None, SetRuntimeFlag(module="chat", flag="streaming", enabled=True))
    assert len(events) == 1 and events[0].changes == Changes()
    assert state is not None and state.flags == dict(sorted(DEFAULTS["chat"].flags.items()))


def test_setting_a_flag_to_its_value_again_is_a_no_op() -> None:
    state, _ = run(configured(), SetRuntimeFlag(module="plugins", flag="beta", enabled=True))
    assert state is not None
    assert decide(state, SetRuntimeFlag(module="plugins", flag="beta", enabled=True), ISSUED) == []
    state, events = run(state, SetRuntimeFlag(module="plugins", flag="beta", enabled=False))
    assert events[0].previous is True and events[0].changes.flags.changed == ["beta"]
    assert state is not None and state.flags == {"beta": False}
    assert state.settings == {"a": 1, "b": "x"}


def test_flags_are_kept_sorted_by_name() -> None:
    state = configured()
    for flag in ("zeta", "alpha", "mid"):
        state, _ = run(state, SetRuntimeFlag(module="plugins", flag=flag, enabled=True))
        assert state is not None
    assert list(state.flags) == ["alpha", "mid", "zeta"]


def test_a_module_holds_a_bounded_number_of_flags() -> None:
    full = RuntimeConfig(settings={}, flags={f"f{i}": True for i in range(MAX_FLAGS)})
    assert rejected(full, SetRuntimeFlag(module="m", flag="one-more", enabled=True)) == (
        "too_many_flags"
    )
    (event,) = decide(full, SetRuntimeFlag(module="m", flag="f0", enabled=False), ISSUED)
    assert isinstance(event, RuntimeFlagUpdated)


def test_update_replaces_every_setting_and_says_what_changed() -> None:
    state, events = run(
        configured(), UpdateRuntimeConfig(module="plugins", settings={"a": 2, "c": True})
    )
    (event,) = events
    assert isinstance(event, RuntimeConfigUpdated)
    assert event.previous_settings == {"a": 1, "b": "x"}
    assert event.settings == {"a": 2, "c": True}
    assert event.changes == Changes(settings=KeyChanges(added=["c"], removed=["b"], changed=["a"]))
    assert state is not None and state.settings == {"a": 2, "c": True}


def test_update_keeps_the_flags() -> None:
    state, _ = run(None, SetRuntimeFlag(module="chat", flag="moderation", enabled=True))
    state, events = run(state, UpdateRuntimeConfig(module="chat", settings={}))
    assert events[0].flags["moderation"] is True
    assert events[0].changes.settings.removed == sorted(DEFAULTS["chat"].settings)
    assert state is not None and state.settings == {} and state.flags["moderation"] is True


def test_an_update_that_changes_nothing_is_a_no_op() -> None:
    state = configured()
    same = UpdateRuntimeConfig(module="plugins", settings={"b": "x", "a": 1})
    assert decide(state, same, ISSUED) == []


@pytest.mark.parametrize(
    ("before", "after", "changed"),
    [
        ({"k": 1}, {"k": 1.0}, ["k"]),
        ({"k": 1}, {"k": True}, ["k"]),
        ({"k": {"x": 1, "y": 2}}, {"k": {"y": 2, "x": 1}}, []),
        ({"k": [1, 2]}, {"k": [2, 1]}, ["k"]),
        ({"k": None}, {"k": None}, []),
    ],
)
def test_values_are_compared_as_json(
    before: dict[str, Any], after: dict[str, Any], changed: list[str]
) -> None:
    assert diff(before, after) == KeyChanges(changed=changed)


def test_reset_goes_back_to_the_declared_defaults() -> None:
    chat = DEFAULTS["chat"]
    state, _ = run(None, UpdateRuntimeConfig(module="chat", settings={"model": "big", "x": 1}))
    state, _ = run(state, SetRuntimeFlag(module="chat", flag="moderation", enabled=True))
    state, _ = run(state, SetRuntimeFlag(module="chat", flag="experimental", enabled=True))
    state, events = run(state, ResetRuntimeConfig(module="chat"))
    (event,) = events
    assert isinstance(event, RuntimeConfigReset)
    assert event.settings == dict(chat.settings) and event.flags == dict(chat.flags)
    assert event.changes == Changes(
        settings=KeyChanges(
            added=sorted(set(chat.settings) - {"model"}), removed=["x"], changed=["model"]
        ),
        flags=KeyChanges(removed=["experimental"], changed=["moderation"]),
    )
    assert state == RuntimeConfig(settings=dict(chat.settings), flags=dict(chat.flags))
    assert decide(state, ResetRuntimeConfig(module="chat"), ISSUED) == []


def test_reset_of_an_undeclared_module_empties_it() -> None:
    state, _ = run(configured(), SetRuntimeFlag(module="plugins", flag="beta", enabled=True))
    state, events = run(state, ResetRuntimeConfig(module="plugins"))
    assert events[0].changes == Changes(
        settings=KeyChanges(removed=["a", "b"]), flags=KeyChanges(removed=["beta"])
    )
    assert state == RuntimeConfig(settings={}, flags={})


@pytest.mark.parametrize("module", ["chat", "plugins"])
def test_reset_of_a_module_never_configured_is_rejected(module: str) -> None:
    assert rejected(None, ResetRuntimeConfig(module=module)) == "not_found"


def test_the_defaults_table_is_not_changed_by_commands() -> None:
    before = {name: (dict(d.settings), dict(d.flags)) for name, d in DEFAULTS.items()}
    state, _ = run(None, SetRuntimeFlag(module="chat", flag="new", enabled=True))
    state, _ = run(state, ResetRuntimeConfig(module="chat"))
    assert state is not None
    state.flags["mutated"] = True
    state.settings["mutated"] = 1
    assert {name: (dict(d.settings), dict(d.flags)) for name, d in DEFAULTS.items()} == before


@pytest.mark.parametrize(
    ("cls", "payload"),
    [
        (SetRuntimeFlag, {"module": "m", "flag": "f", "enabled": "yes"}),
        (SetRuntimeFlag, {"module": "m", "flag": "f", "enabled": 1}),
        (SetRuntimeFlag, {"module": "m", "flag": "", "enabled": True}),
        (SetRuntimeFlag, {"module": "m", "flag": "f" * 129, "enabled": True}),
        (SetRuntimeFlag, {"module": "", "flag": "f", "enabled": True}),
        (SetRuntimeFlag, {"module": "a/b", "flag": "f", "enabled": True}),
        (SetRuntimeFlag, {"module": "m", "flag": "f", "enabled": True, "x": 1}),
        (UpdateRuntimeConfig, {"module": "m"}),
        (UpdateRuntimeConfig, {"module": "m", "settings": []}),
        (UpdateRuntimeConfig, {"module": "m", "settings": {"": 1}}),
        (UpdateRuntimeConfig, {"module": "m" * 129, "settings": {}}),
        (ResetRuntimeConfig, {"module": "m", "settings": {}}),
    ],
)
def test_payloads_that_break_the_schema_do_not_decode(cls: type, payload: dict[str, Any]) -> None:
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(msgspec.json.encode(payload), type=cls)


def test_the_context_is_keyed_by_module_and_open_to_the_default_roles() -> None:
    assert CONTEXT.name == "runtime_config" and CONTEXT.aggregate_field == "module"
    for command in CONTEXT.commands:
        assert CONTEXT.allowed_roles(command.__name__) == DEFAULT_ROLES


def test_state_survives_its_wire_form() -> None:
    state = configured()
    raw = msgspec.json.encode(state)
    assert msgspec.json.decode(raw, type=RuntimeConfig) == state
