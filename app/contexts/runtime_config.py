"""Runtime config: per-module settings and feature flags, every change kept as history.

Pure domain code: no I/O, nothing from `streams` or `projections`.

Deliberate choices (API.md is silent on them):

- A module's config starts from its declared defaults (`DEFAULTS`; any other module:
  no settings, no flags) on its first command, and every event carries the whole
  config after it (`settings`, `flags`) and what changed (`changes`), so the read
  models never need the defaults table: a replay gives the same rows even after
  the table changes.
- A command that changes nothing on a configured module is a no-op: processed,
  no event, no history entry. The first command on a module always records an
  event (version 1), even if it leaves the defaults as they are, so the module
  counts as configured from then on.
- Until then the module is unknown to the read models: its queries answer 404,
  even for a module with declared defaults (the defaults are this module's
  knowledge, not the read models').
- `ResetRuntimeConfig` of a module never configured is rejected `not_found`: there
  is nothing to reset (and its queries answer 404 too).
- A module name holds no `/` (it is a path segment of every query route).
- A module holds at most `MAX_FLAGS` flags (`too_many_flags`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any

import msgspec

from core.errors import Rejected
from core.messages import Command, Context, Event, Issued, State

Module = Annotated[str, msgspec.Meta(min_length=1, max_length=128, pattern=r"^[^/]+$")]
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
Settings = Annotated[dict[Name, Any], msgspec.Meta(max_length=500)]

MAX_FLAGS = 500


@dataclass(frozen=True)
class ModuleDefaults:
    settings: Mapping[str, Any] = field(default_factory=dict)
    flags: Mapping[str, bool] = field(default_factory=dict)


DEFAULTS: dict[str, ModuleDefaults] = {
    "chat": ModuleDefaults(
        settings={"model": "default", "temperature": 0.7, "max_tokens": 1024, "history_window": 50},
        flags={"streaming": True, "tool_calls": True, "moderation": False},
    ),
    "traces": ModuleDefaults(
        settings={"retention_days": 30, "sample_rate": 1.0, "max_spans_per_trace": 1000},
        flags={"capture_attributes": True, "export": False},
    ),
}
NO_DEFAULTS = ModuleDefaults()


# -- commands ---------------------------------------------------------------


class SetRuntimeFlag(Command, frozen=True, kw_only=True):
    module: Module
    flag: Name
    enabled: bool


class UpdateRuntimeConfig(Command, frozen=True, kw_only=True):
    module: Module
    settings: Settings
    """Replaces every setting: a key left out is removed."""


class ResetRuntimeConfig(Command, frozen=True, kw_only=True):
    module: Module


# -- events -----------------------------------------------------------------


class KeyChanges(msgspec.Struct, frozen=True, kw_only=True):
    """Names of the keys added, removed and changed, each sorted."""

    added: list[str] = []
    removed: list[str] = []
    changed: list[str] = []


class Changes(msgspec.Struct, frozen=True, kw_only=True):
    settings: KeyChanges = msgspec.field(default_factory=KeyChanges)
    flags: KeyChanges = msgspec.field(default_factory=KeyChanges)


class RuntimeFlagUpdated(Event, frozen=True, kw_only=True):
    module: str
    flag: str
    enabled: bool
    previous: bool | None
    """None: the flag did not exist before."""
    settings: dict[str, Any]
    """The settings after the event (unchanged by it, but the defaults on a first command)."""
    flags: dict[str, bool]
    """Every flag after the event."""
    changes: Changes


class RuntimeConfigUpdated(Event, frozen=True, kw_only=True):
    module: str
    settings: dict[str, Any]
    previous_settings: dict[str, Any]
    flags: dict[str, bool]
    changes: Changes


class RuntimeConfigReset(Event, frozen=True, kw_only=True):
    module: str
    settings: dict[str, Any]
    """The module's defaults."""
    flags: dict[str, bool]
    changes: Changes


# -- state and rules --------------------------------------------------------


class RuntimeConfig(State, frozen=True, kw_only=True):
    settings: dict[str, Any]
    flags: dict[str, bool]


def defaults_of(module: str) -> RuntimeConfig:
    declared = DEFAULTS.get(module, NO_DEFAULTS)
    return RuntimeConfig(settings=dict(declared.settings), flags=_sorted(dict(declared.flags)))


def decide(state: RuntimeConfig | None, command: Command, issued: Issued) -> list[Event]:
    match command:
        case SetRuntimeFlag():
            config = defaults_of(command.module) if state is None else state
            previous = config.flags.get(command.flag)
            if previous is None and len(config.flags) >= MAX_FLAGS:
                raise Rejected("too_many_flags", f"a module holds at most {MAX_FLAGS} flags")
            flags = _sorted({**config.flags, command.flag: command.enabled})
            changes = Changes(flags=diff(config.flags, flags))
            if state is not None and changes == Changes():
                return []
            return [
                RuntimeFlagUpdated(
                    module=command.module,
                    flag=command.flag,
                    enabled=command.enabled,
                    previous=previous,
                    settings=config.settings,
                    flags=flags,
                    changes=changes,
                )
            ]
        case UpdateRuntimeConfig():
            config = defaults_of(command.module) if state is None else state
            changes = Changes(settings=diff(config.settings, command.settings))
            if state is not None and changes == Changes():
                return []
            return [
                RuntimeConfigUpdated(
                    module=command.module,
                    settings=command.settings,
                    previous_settings=config.settings,
                    flags=config.flags,
                    changes=changes,
                )
            ]
        case ResetRuntimeConfig():
            if state is None:
                raise Rejected("not_found", f"runtime config {command.module} was never set")
            defaults = defaults_of(command.module)
            changes = Changes(
                settings=diff(state.settings, defaults.settings),
                flags=diff(state.flags, defaults.flags),
            )
            if changes == Changes():
                return []
            return [
                RuntimeConfigReset(
                    module=command.module,
                    settings=defaults.settings,
                    flags=defaults.flags,
                    changes=changes,
                )
            ]
    raise TypeError(f"not a runtime-config command: {type(command).__name__}")


_canonical = msgspec.json.Encoder(order="sorted")


def diff(before: Mapping[str, Any], after: Mapping[str, Any]) -> KeyChanges:
    """The keys added, removed and changed from `before` to `after`, compared as JSON
    (so `1`, `1.0` and `true` differ, and the order of an object's keys does not count)."""
    return KeyChanges(
        added=sorted(after.keys() - before.keys()),
        removed=sorted(before.keys() - after.keys()),
        changed=sorted(
            key
            for key in before.keys() & after.keys()
            if _canonical.encode(before[key]) != _canonical.encode(after[key])
        ),
    )


def _sorted(flags: dict[str, bool]) -> dict[str, bool]:
    return dict(sorted(flags.items()))


def evolve(state: RuntimeConfig | None, event: Event) -> RuntimeConfig:
    match event:
        case RuntimeFlagUpdated() | RuntimeConfigUpdated() | RuntimeConfigReset():
            return RuntimeConfig(settings=event.settings, flags=event.flags)
    raise TypeError(f"not a runtime-config event: {type(event).__name__}")


CONTEXT = Context(
    name="runtime_config",
    aggregate_field="module",
    commands=(SetRuntimeFlag, UpdateRuntimeConfig, ResetRuntimeConfig),
    events=(RuntimeFlagUpdated, RuntimeConfigUpdated, RuntimeConfigReset),
    state=RuntimeConfig,
    decide=decide,
    evolve=evolve,
)
