"""The `eddy` command: the Procfile's processes, migrations, tokens and `eddy dev`.

`main()` parses arguments and runs `async_main()` under anyio; tests call the
async functions directly.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Mapping, Sequence

import anyio

from app import runtime
from app.auth import issue_token
from app.errors import ConfigurationError
from app.settings import Settings

log = logging.getLogger("eddy")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="eddy", description="Eddy, a realtime CQRS backend.")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("web", help="serve HTTP, SSE and WebSocket on $PORT")
    sub.add_parser("worker", help="apply commands (any number of these share the shards)")
    sub.add_parser("projector", help="keep the read models up to date")
    sub.add_parser("migrate", help="create or upgrade the Postgres tables (the release step)")
    sub.add_parser("dev", help="everything in one process, with embedded Redis and Postgres")
    token = sub.add_parser("token", help="print a JWT for a tenant, subject and roles")
    token.add_argument("--tenant", required=True)
    token.add_argument("--sub", required=True)
    token.add_argument(
        "--roles", default="admin", help="comma-separated: admin,agent,user,observer"
    )
    token.add_argument("--ttl", type=int, default=24 * 3600, help="lifetime in seconds")
    return p


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )


def require_secret(settings: Settings) -> None:
    if len(settings.jwt_secret) < 32:
        raise ConfigurationError("EDDY_JWT_SECRET must be set, at least 32 characters (HS256)")


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    args = parser().parse_args(argv)
    env = os.environ if env is None else env
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

            return int(run_dev(settings, env))
        if args.command == "migrate":
            applied = anyio.run(runtime.migrate, settings)
            print(f"migrations applied: {', '.join(applied) or 'none (up to date)'}")
            return 0
        if args.command == "web":
            require_secret(settings)
        process = {
            "web": runtime.serve_web,
            "worker": runtime.run_worker,
            "projector": runtime.run_projector,
        }[args.command]
        runtime.run_until_signal(lambda: process(settings))
        return 0
    except ConfigurationError as exc:
        print(f"eddy: {exc.message}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"eddy: {exc}", file=sys.stderr)
        return 2
