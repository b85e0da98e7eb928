"""Eddy's exception tree.

Every error a client can cause is an `EddyError` with a stable `code` and an HTTP
`status`; `app.web` turns them into responses (and `app.ws` into error frames) in
exactly one place. Anything else reaching a handler is a bug and answers 500.
"""

from __future__ import annotations

from typing import Any


class EddyError(Exception):
    """Base of every error with a client-facing meaning."""

    code = "error"
    status = 400

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


class ConfigurationError(EddyError):
    """The environment is missing a setting or holds a bad one (raised at start-up)."""

    code = "configuration"
    status = 500


class Malformed(EddyError):
    """The request body is not JSON, or not a JSON object."""

    code = "malformed"
    status = 400


class Invalid(EddyError):
    """The payload breaks the command's schema; `fields` lists `{path, message}`."""

    code = "invalid"
    status = 422


class UnknownCommand(EddyError):
    """No command type of that name exists."""

    code = "unknown_command"
    status = 404


class NotFound(EddyError):
    """The tenant has no such command, aggregate or read-model row."""

    code = "not_found"
    status = 404


class Unauthenticated(EddyError):
    """No token, or a token that is expired, forged or missing a claim."""

    code = "unauthenticated"
    status = 401


class Forbidden(EddyError):
    """A valid token whose roles do not allow the action."""

    code = "forbidden"
    status = 403


class TooLarge(EddyError):
    """The body is over `EDDY_MAX_BODY_BYTES`."""

    code = "too_large"
    status = 413


class RateLimited(EddyError):
    """A tenant over its rate of commands or queries, or a connection over its rate of
    requests (`app/limits.py`); nothing of the request was read or done. Answers 429
    with `Retry-After: <retry_after_s>` (whole seconds, at least 1); over a WebSocket,
    an error frame."""

    code = "rate_limited"
    status = 429

    def __init__(self, message: str, *, retry_after_s: int, limit: str) -> None:
        super().__init__(message, retry_after_s=retry_after_s, limit=limit)
        self.retry_after_s = retry_after_s


class IdempotencyKeyReused(EddyError):
    """An `Idempotency-Key` (a command id) already names another command: another
    type, or another payload (compared by a digest of its canonical JSON). As the
    IETF Idempotency-Key draft says: 422, and nothing is accepted; the same key with
    the same command gets the first one's answer."""

    code = "idempotency_key_reused"
    status = 422


class BadPosition(EddyError):
    """A position token (`?after=`, `Last-Event-ID`, `since`) that Eddy did not issue."""

    code = "bad_position"
    status = 400


class BadRequest(EddyError):
    """A query parameter or header with a wrong value."""

    code = "bad_request"
    status = 400


class Stale(EddyError):
    """The read model did not reach the `?after=` position in time."""

    code = "stale"
    status = 504


class Unavailable(EddyError):
    """Redis or Postgres cannot be reached; nothing was accepted, retry with the same key."""

    code = "unavailable"
    status = 503


class Rejected(EddyError):
    """A command broken by a domain rule (raised by a context's `decide`).

    Becomes the command's `failed` status with `{code, message}`; with `?wait=` a 409.
    """

    code = "rejected"
    status = 409

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class Refused(EddyError):
    """A WebSocket frame the socket's state does not allow: `already_subscribed`,
    `not_subscribed`, `too_many_subscriptions`, `too_many_pending` (an error frame;
    the socket stays open)."""

    status = 409

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
