"""Server processes of a benchmark phase, and where the CPU went during a phase.

Every process is started with its output in a log file and stopped with SIGTERM
(SIGKILL after a deadline), and its exit is awaited: a phase starts only once
the previous phase's servers are gone (LIMITS.md pitfall).

CPU accounting reads `/proc` (Linux): each child's own CPU time, this process's
(the load generator), Redis's (`INFO cpu`), every `postgres` process's, and the
whole machine's busy time; "other" is what is left, e.g. someone else's tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path

import httpx
import redis.asyncio as aioredis

ROOT = Path(__file__).resolve().parent.parent
TICK_S = 1 / os.sysconf("SC_CLK_TCK")
STOP_DEADLINE_S = 20.0


class Proc:
    """One child process, started by `start()` (or `running()`), its output in `log`."""

    def __init__(self, name: str, argv: Sequence[str], env: Mapping[str, str], log: Path) -> None:
        self.name = name
        self.argv = list(argv)
        self.env = dict(env)
        self.log = log
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self) -> Proc:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as out:
            self.popen = subprocess.Popen(
                self.argv,
                env=self.env,
                cwd=ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    def _started(self) -> subprocess.Popen[bytes]:
        if self.popen is None:
            raise RuntimeError(f"{self.name} was never started")
        return self.popen

    def cpu_s(self) -> float:
        popen = self._started()
        return proc_cpu_s(popen.pid) if popen.poll() is None else 0.0

    def check(self) -> None:
        """Raise if the process has exited."""
        code = self._started().poll()
        if code is not None:
            raise RuntimeError(f"{self.name} exited with {code}; see {self.log}")

    async def wait(self) -> int:
        """Wait for the process to exit by itself; its exit code."""
        return await asyncio.to_thread(self._started().wait)

    async def stop(self) -> None:
        """SIGTERM, wait for the exit; SIGKILL after `STOP_DEADLINE_S`."""
        popen = self.popen
        if popen is None:
            return
        if popen.poll() is None:
            popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_DEADLINE_S
        while popen.poll() is None:
            if time.monotonic() > deadline:
                popen.kill()
                deadline = time.monotonic() + STOP_DEADLINE_S
            await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def running(*procs: Proc) -> AsyncIterator[None]:
    """Start every process; on exit stop them all at once and wait until each is gone."""
    try:
        for p in procs:
            p.start()
        yield
    finally:
        await asyncio.gather(*(p.stop() for p in procs))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_http(url: str, procs: Sequence[Proc], timeout_s: float = 30.0) -> None:
    """Poll `url` until it answers 200, while every process in `procs` stays up."""
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(timeout=2.0) as client:
        while True:
            for p in procs:
                p.check()
            with contextlib.suppress(httpx.HTTPError):
                if (await client.get(url)).status_code == 200:
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} not ready after {timeout_s} s")
            await asyncio.sleep(0.1)


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of one process (0 if it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * TICK_S


def _postgres_cpu() -> dict[int, float]:
    found: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if (entry / "comm").read_text().strip() == "postgres":
                    found[int(entry.name)] = proc_cpu_s(int(entry.name))
    return found


def _machine_busy_s() -> float:
    first = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    ticks = [int(v) for v in first]
    idle = ticks[3] + ticks[4]  # idle + iowait
    return (sum(ticks[:8]) - idle) * TICK_S


def _self_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _redis_cpu_s(client: aioredis.Redis) -> float:
    try:
        info = await client.info("cpu")
    except (OSError, ValueError):
        return 0.0
    return float(info.get("used_cpu_user", 0.0)) + float(info.get("used_cpu_sys", 0.0))


class CpuMeter:
    """CPU used between `start()` and `stop()`, in cores (CPU seconds per wall second)."""

    def __init__(self, client: aioredis.Redis, procs: Sequence[Proc]) -> None:
        self.client = client
        self.procs = procs

    async def _sample(self) -> tuple[float, dict[str, float], dict[int, float], float]:
        named = {"loadgen": _self_cpu_s(), "redis": await _redis_cpu_s(self.client)}
        for p in self.procs:
            named[p.name] = p.cpu_s()
        return time.perf_counter(), named, _postgres_cpu(), _machine_busy_s()

    async def start(self) -> None:
        self.before = await self._sample()

    async def stop(self) -> tuple[float, dict[str, float]]:
        """The wall time since `start()`, and the cores each process used."""
        t0, named0, pg0, busy0 = self.before
        t1, named1, pg1, busy1 = await self._sample()
        wall = t1 - t0
        cores = {name: (named1[name] - named0.get(name, 0.0)) / wall for name in named1}
        cores["postgres"] = sum(v - pg0.get(pid, 0.0) for pid, v in pg1.items()) / wall
        cores["machine"] = (busy1 - busy0) / wall
        cores["other"] = cores["machine"] - sum(
            v for k, v in cores.items() if k not in ("machine", "other")
        )
        return wall, {k: round(max(v, 0.0), 3) for k, v in cores.items()}
