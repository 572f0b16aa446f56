"""A real PostgreSQL for the tests: a private cluster in a temporary directory, made with the server's own
``initdb`` and run with ``pg_ctl`` (Debian's ``postgresql`` package; ``.ci/run`` installs it), as the
``postgres`` user when the tests run as root (the server refuses to run as root). Where there is no
server, the tests that need one skip, saying why."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from wattgate.proxy.serving import free_port


def _bindir() -> Path | None:
    if (found := shutil.which("pg_ctl")) and (Path(found).parent / "initdb").exists():
        return Path(found).resolve().parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    return Path(candidates[-1]).parent if candidates else None


class Cluster:
    """One running server on 127.0.0.1 with trust auth, its data in ``home``; :meth:`url` of a database."""

    def __init__(self, home: Path, bindir: Path) -> None:
        self.home, self.bindir, self.port = home, bindir, free_port()
        self.data = home / "data"
        self._as_postgres = os.geteuid() == 0

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.bindir / args[0]), *args[1:]]
        if self._as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        return subprocess.run(cmd, check=check, capture_output=True, text=True, timeout=120)

    def init(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        if self._as_postgres:
            shutil.chown(self.home, "postgres", "postgres")
            os.chmod(self.home, 0o700)
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")

    def start(self) -> None:
        options = f"-p {self.port} -k {self.home} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.home / "server.log"), "-o", options, "-w", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop", check=False)

    def create_database(self, name: str) -> str:
        self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", name)
        return self.url(name)

    def url(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"


@contextmanager
def cluster() -> Iterator[Cluster]:
    """A started cluster in a directory of its own under the system's temp (pytest's are root's only,
    where the server's user cannot reach); raises RuntimeError saying why there can be none."""
    bindir = _bindir()
    if bindir is None:
        raise RuntimeError("no PostgreSQL server here (apt-get install postgresql)")
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        raise RuntimeError("running as root without runuser to start the server as postgres")
    c = Cluster(Path(tempfile.mkdtemp(prefix="wattgate-pg-")), bindir)
    try:
        c.init()
        c.start()
    except subprocess.CalledProcessError as exc:
        raise RuntimeError(f"could not start PostgreSQL: {(exc.stderr or exc.stdout).strip()[-500:]}") from None
    try:
        yield c
    finally:
        c.stop("immediate")
        shutil.rmtree(c.home, ignore_errors=True)
