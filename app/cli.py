"""The `eddy` command: the Procfile's processes, migrations, tokens and `eddy dev`,
each run for the system of `app/registry.py`.

`main()` parses arguments and runs the async functions of `app/runtime.py` under
anyio; tests call those directly.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TextIO

import anyio

from app import runtime
from app.auth import issue_token
from app.registry import SYSTEM
from app.system import System
from core.errors import ConfigurationError, EddyError
from core.outages import FAILED
from core.settings import Settings
from devserver.local import HOME, dev_secret, running
from projections.rebuild import CannotRebuild, RebuildBusy
from streams.positions import format_entry_id
from streams.retention import MAX_COUNTED, Trim

log = logging.getLogger("eddy")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="eddy", description="Eddy, a realtime CQRS backend.")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("web", help="serve HTTP, SSE and WebSocket on $PORT")
    sub.add_parser("worker", help="apply commands (any number of these share the shards)")
    sub.add_parser("projector", help="keep the read models up to date")
    sub.add_parser("migrate", help="create or upgrade the Postgres tables (the release step)")
    sub.add_parser("dev", help="everything in one process, with embedded Redis and Postgres")
    status = sub.add_parser(
        "status", help="every projection's checkpoint, lag and last error, per shard"
    )
    status.add_argument("--json", action="store_true", help="a JSON list instead of a table")
    rebuild = sub.add_parser(
        "rebuild", help="build a projection's tables again from history, then swap them in"
    )
    rebuild.add_argument("projection")
    rebuild.add_argument(
        "--verify",
        action="store_true",
        help="check that the new tables equal the old ones at the swap (slower)",
    )
    trim = sub.add_parser(
        "trim", help="trim the streams now, as far as retention and their readers allow"
    )
    trim.add_argument("--dry-run", action="store_true", help="only print what would be trimmed")
    trim.add_argument("--json", action="store_true", help="a JSON list instead of a table")
    drift = sub.add_parser(
        "drift", help="compare the projections' declared tables with the database"
    )
    drift_action = drift.add_subparsers(dest="drift", required=True)
    for action, text in (
        ("check", "print every difference (exit 1 if there is any)"),
        ("repair", "fix the safe differences; print what needs a rebuild (exit 1 if any)"),
    ):
        drift_action.add_parser(action, help=text).add_argument(
            "--json", action="store_true", help="one JSON object instead of lines"
        )
    dead = sub.add_parser(
        "deadletters", help="commands and events that kept failing: list, show, replay, purge"
    )
    dead_action = dead.add_subparsers(dest="deadletters", required=True)
    dead_action.add_parser("list", help="every dead letter, oldest first").add_argument(
        "--json", action="store_true", help="a JSON list instead of a table"
    )
    for action, text in (
        ("show", "one dead letter, with its record or envelope (JSON)"),
        ("replay", "put it back: a command into its stream, an event to its one consumer"),
    ):
        dead_action.add_parser(action, help=text).add_argument("id")
    purge = dead_action.add_parser("purge", help="delete a dead letter (or --all of them)")
    purge.add_argument("id", nargs="?")
    purge.add_argument("--all", action="store_true", help="every dead letter of every tenant")
    token = sub.add_parser("token", help="print a JWT for a tenant, subject and roles")
    token.add_argument("--tenant", required=True)
    token.add_argument("--sub", required=True)
    token.add_argument(
        "--roles", default="admin", help="comma-separated: admin,agent,user,observer"
    )
    token.add_argument("--ttl", type=int, default=24 * 3600, help="lifetime in seconds")
    return p


class ProgressBar:
    """One line on a terminal, redrawn in place; a line per phase change elsewhere."""

    WIDTH = 30

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.tty = out.isatty()
        self.phase = ""

    def show(self, phase: str, done: int, total: int) -> None:
        if total:
            filled = min(self.WIDTH, self.WIDTH * done // total)
            bar = "#" * filled + "-" * (self.WIDTH - filled)
            line = f"{phase:<8} [{bar}] {done:,}/{total:,} ({100 * done // total}%)"
        else:
            line = f"{phase:<8} {done:,} events"
        if self.tty:
            self.out.write("\r" + line.ljust(72))
            self.out.flush()
        elif phase != self.phase:
            print(line, file=self.out)
        self.phase = phase

    def done(self) -> None:
        if self.tty:
            self.out.write("\n")


DOING = {"status": "read the status", "trim": "trim"}
"""What a failing command could not do, in its message (otherwise: run it)."""


def cannot(settings: Settings, doing: str, exc: BaseException) -> int:
    """Say why `doing` failed: which server does not answer (or is not migrated);
    the error itself if both look fine. The exit code: 1."""
    problems = anyio.run(runtime.diagnose, settings) or [repr(exc)]
    for problem in problems:
        print(f"eddy: cannot {doing}: {problem}", file=sys.stderr)
    return 1


def with_local_dev(env: Mapping[str, str], home: Path) -> Mapping[str, str]:
    """The environment, completed by an `eddy dev` running in `home` (`.eddy/` of this
    folder): its servers where `REDIS_URL`, `DATABASE_URL`, `PORT` are not set, and
    its JWT secret where `EDDY_JWT_SECRET` is not. A variable that is set wins."""
    found = running(home) or {}
    added = {name: value for name, value in found.items() if name not in env}
    if "EDDY_JWT_SECRET" not in env and (secret := dev_secret(home)) is not None:
        added["EDDY_JWT_SECRET"] = secret
    if not added:
        return env
    if found:
        print(f"eddy: using the servers of the `eddy dev` running in {home}", file=sys.stderr)
    return {**env, **added}


def trim(settings: Settings, system: System, *, dry_run: bool, as_json: bool) -> int:
    """`eddy trim [--dry-run] [--json]`: one pass of the trimmer now, and what it did."""
    trims = anyio.run(lambda: runtime.trim(settings, system, dry_run=dry_run))
    print(trim_table(trims, dry_run=dry_run, as_json=as_json))
    return 0


def trim_table(trims: Sequence[Trim], *, dry_run: bool, as_json: bool) -> str:
    """`eddy trim`'s output: per stream, its length, the trim point and what holds it."""
    if as_json:
        return json.dumps([t.as_json() for t in trims])
    removed = "would remove" if dry_run else "removed"
    lines = [f"{'stream':<48} {'length':>8}  {'kept from':<20} {'held by':<28} {removed}"]
    for t in trims:
        count = f"{MAX_COUNTED}+" if t.removed > MAX_COUNTED else str(t.removed)
        upto = format_entry_id(t.upto)
        lines.append(f"{t.stream:<48} {t.length:>8}  {upto:<20} {t.held_by:<28} {count}")
    return "\n".join(lines)


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )


def require_secret(settings: Settings) -> None:
    if len(settings.jwt_secret) < 32:
        raise ConfigurationError("EDDY_JWT_SECRET must be set, at least 32 characters (HS256)")


def deadletters(settings: Settings, system: System, args: argparse.Namespace) -> int:
    """`eddy deadletters list | show <id> | replay <id> | purge <id> | purge --all`."""
    from app import admin

    if args.deadletters == "purge" and bool(args.id) == bool(args.all):
        raise ValueError("deadletters purge takes a dead letter id or --all")
    try:
        return anyio.run(
            lambda: admin.command_line(
                settings,
                system,
                args.deadletters,
                getattr(args, "id", None),
                every=getattr(args, "all", False),
                as_json=getattr(args, "json", False),
                out=sys.stdout,
            )
        )
    except EddyError as exc:  # no such dead letter, or it cannot be replayed now
        print(f"eddy: {exc.code}: {exc.message}", file=sys.stderr)
        return 1


def main(
    argv: Sequence[str] | None = None,
    env: Mapping[str, str] | None = None,
    system: System = SYSTEM,
) -> int:
    args = parser().parse_args(argv)
    env = os.environ if env is None else env
    if args.command != "dev":
        env = with_local_dev(env, Path.cwd() / HOME)
    try:
        settings = Settings.from_env(env)
        configure_logging(settings.log_level)
        if args.command == "token":
            require_secret(settings)
            roles = [r.strip() for r in args.roles.split(",") if r.strip()]
            print(
                issue_token(
                    settings.jwt_secret,
                    tenant=args.tenant,
                    sub=args.sub,
                    roles=roles,
                    ttl_s=args.ttl,
                )
            )
            return 0
        if args.command == "dev":
            from app.dev import run_dev

            return int(run_dev(settings, system, env))
        if args.command == "migrate":
            applied = anyio.run(runtime.migrate, settings, system)
            print(f"migrations applied: {', '.join(applied) or 'none (up to date)'}")
            return 0
        if args.command == "status":
            from projections import status

            shards = anyio.run(status.report, settings, system.projections)
            print(status.to_json(shards) if args.json else status.table(shards))
            return 0
        if args.command == "trim":
            return trim(settings, system, dry_run=args.dry_run, as_json=args.json)
        if args.command == "drift":
            from projections import drift

            run = drift.repair if args.drift == "repair" else drift.check
            outcome = anyio.run(run, settings.database_url, settings.db_schema, system.projections)
            print(outcome.json() if args.json else outcome.text())
            return outcome.exit_code
        if args.command == "deadletters":
            return deadletters(settings, system, args)
        if args.command == "rebuild":
            bar = ProgressBar(sys.stderr)
            report = anyio.run(
                lambda: runtime.rebuild(
                    settings, system, args.projection, verify=args.verify, progress=bar.show
                )
            )
            bar.done()
            print(
                f"rebuilt {report.projection} (version {report.version}):"
                f" {report.events:,} events ({report.from_archive:,} from the archive,"
                f" {report.from_streams + report.caught_up_at_swap:,} from the streams),"
                f" tables {', '.join(report.tables)}"
                + ("" if report.identical is None else f"; identical: {report.identical}")
            )
            return 0 if report.identical is not False else 1
        if args.command == "web":
            require_secret(settings)
        process = {
            "web": runtime.web_process,
            "worker": runtime.worker_process,
            "projector": runtime.projector_process,
        }[args.command]
        runtime.run_until_signal(lambda: process(settings, system))
        return 0
    except ConfigurationError as exc:
        print(f"eddy: {exc.message}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"eddy: {exc}", file=sys.stderr)
        return 2
    except RebuildBusy as exc:
        print(f"eddy: {exc}", file=sys.stderr)
        return 1
    except CannotRebuild as exc:
        print(f"eddy: {exc}", file=sys.stderr)
        return 2
    except FAILED as exc:  # a server away, or a schema never migrated: say which
        return cannot(settings, DOING.get(args.command, f"run `eddy {args.command}`"), exc)
