"""`eddy dev` as the README's first command runs it: a real process in an empty
folder, with no Redis or Postgres named (embedded ones, their data in `.eddy/`),
serving a command end to end, then stopped by SIGTERM with everything it started.

Meanwhile the other `eddy` commands, run in the same folder with nothing set, find
its servers and its secret by themselves (`eddy token`, `eddy status`); its log
says in one line per tick which shards a process took, and never shows a token a
browser passed in a WebSocket's query."""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path

import anyio
import httpx
import pytest
from websockets.asyncio.client import connect

from devserver import embedded
from devserver.embedded import free_port
from tests.processes import EDDY
from tests.services import scratch_dir

BANNER_TIMEOUT_S = 60


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_eddy_dev_serves_from_an_empty_folder_and_stops_on_sigterm() -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDDY_")}
    env = {k: v for k, v in env.items() if k not in ("REDIS_URL", "DATABASE_URL")}
    env |= {"PORT": str(port), "EDDY_LOG_LEVEL": "info"}
    with scratch_dir("dev") as folder, (Path(folder) / "dev.log").open("wb") as out:
        logged = Path(folder) / "dev.log"
        process = await anyio.open_process(
            [str(EDDY), "dev"], cwd=folder, env=env, stdout=out, stderr=subprocess.STDOUT
        )
        try:
            with anyio.fail_after(BANNER_TIMEOUT_S):
                # a file is the only signal: no event to wait for
                while b"Ctrl-C stops everything." not in (output := logged.read_bytes()):  # noqa: ASYNC110
                    await anyio.sleep(0.05)
            token = re.search(rb"export TOKEN=(\S+)", output)
            assert token is not None, output.decode(errors="replace")
            auth = {"Authorization": f"Bearer {token[1].decode()}"}
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as c:
                assert (await c.get("/readyz")).status_code == 200
                r = await c.post(
                    "/v1/commands/CreateChatSession?wait=5",
                    json={"agent_id": "a", "participants": []},
                    headers=auth,
                )
                assert r.status_code == 200, r.text
                session_id = r.json()["session_id"]
                r = await c.get(
                    f"/v1/chat-sessions/{session_id}",
                    params={"after": r.json()["position"]},
                    headers=auth,
                )
                assert r.status_code == 200, r.text

                # other commands of the same folder find the dev servers and secret
                made = await anyio.run_process(
                    [str(EDDY), "token", "--tenant", "dev", "--sub", "bob", "--roles", "user"],
                    cwd=folder,
                    env=bare(env),
                )
                bob = {"Authorization": f"Bearer {made.stdout.decode().strip()}"}
                assert (await c.get("/v1/chat-sessions", headers=bob)).status_code == 200
                status = await anyio.run_process(
                    [str(EDDY), "status"], cwd=folder, env=bare(env), check=False
                )
                assert status.returncode == 0, status.stderr.decode()
                assert "chat_sessions" in status.stdout.decode()

                # a browser's token in a WebSocket's query is not logged
                ws_url = f"ws://127.0.0.1:{port}/v1/ws?access_token={token[1].decode()}"
                async with connect(ws_url) as ws:
                    await ws.send('{"op": "ping", "ref": "p"}')
                    assert "pong" in await ws.recv()
        finally:
            process.send_signal(signal.SIGTERM)
            with anyio.fail_after(30):
                code = await process.wait()
        log = logged.read_text(errors="replace")
        assert code == 0, log
        # the token is in the banner, made for the person who started it, and only there
        assert log.count(token[1].decode()) == 1 and "access_token=[redacted]" in log, log
        assert "shard-taken" not in log and "shards-taken role=worker" in log, log
        home = Path(folder) / ".eddy"
        assert (home / "jwt-secret").exists()
        # both servers stopped with it
        assert not (embedded.postgres_data_dir(home / "postgres") / "postmaster.pid").exists()
        valkey = home / "valkey" / "valkey.pid"
        assert not valkey.exists() or not _alive(int(valkey.read_text().strip() or 0))


def bare(env: dict[str, str]) -> dict[str, str]:
    """An environment that names no server, no port and no secret."""
    return {k: v for k, v in env.items() if k != "PORT" and not k.startswith("EDDY_")}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return pid > 0
