"""`eddy dev` as the README's first command runs it: a real process in an empty
folder, with no Redis or Postgres named (embedded ones, their data in `.eddy/`),
serving a command end to end, then stopped by SIGTERM with everything it started."""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path

import anyio
import httpx
import pytest

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
    env |= {"PORT": str(port), "EDDY_LOG_LEVEL": "warning"}
    with scratch_dir("dev") as folder:
        process = await anyio.open_process(
            [str(EDDY), "dev"], cwd=folder, env=env, stderr=subprocess.STDOUT
        )
        assert process.stdout is not None
        output = b""
        try:
            with anyio.fail_after(BANNER_TIMEOUT_S):
                while b"Ctrl-C stops everything." not in output:
                    chunk = await process.stdout.receive()
                    output += chunk
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
        finally:
            process.send_signal(signal.SIGTERM)
            with anyio.fail_after(30):
                code = await process.wait()
        assert code == 0, output.decode(errors="replace")
        home = Path(folder) / ".eddy"
        assert (home / "jwt-secret").exists()
        # both servers stopped with it
        assert not (embedded.postgres_data_dir(home / "postgres") / "postmaster.pid").exists()
        valkey = home / "valkey" / "valkey.pid"
        assert not valkey.exists() or not _alive(int(valkey.read_text().strip() or 0))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return pid > 0
