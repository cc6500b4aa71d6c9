"""Harnesses shared by the tests and the benchmarks (bench/ imports them): the endpoint role run alone."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from pathlib import Path

from appliance.ipc import schema as S
from appliance.ipc.channel import SyncChannel

REPO = Path(__file__).resolve().parent.parent


class EndpointRole:
    """`donjon role ocsp` started as the supervisor starts it: socketpairs for its links and an inherited
    listening socket. `sup` and `fac` are our ends of its links: the caller plays the supervisor and the
    Factory. `donjon` is the command that runs the CLI (the source tree's or a bundle's)."""

    def __init__(self, store: Path, listen: socket.socket, log: Path, donjon: list[str], timeout: float = 30,
                 max_connections: int = 64, read_timeout: float = 5.0, max_age: int = 600,
                 max_per_source: int = 64):
        self.sup_s, sup_r = socket.socketpair()
        self.fac_s, fac_r = socket.socketpair()
        fds = {"sup-ocsp": sup_r.fileno(), "factory-ocsp": fac_r.fileno(), "listen": listen.fileno()}
        argv = [*donjon, "role", "ocsp", "--rw", str(store)]
        for k, v in fds.items():
            argv += ["--fd", f"{k}={v}"]
        self.log = open(log, "ab")
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen(argv, pass_fds=list(fds.values()), cwd=REPO, stdin=subprocess.DEVNULL,
                                     stdout=self.log, stderr=self.log)
        sup_r.close()
        fac_r.close()
        for s in (self.sup_s, self.fac_s):
            s.settimeout(timeout)
        self.sup = SyncChannel(self.sup_s, "sup-ocsp", S.OcspToSup)
        self.fac = SyncChannel(self.fac_s, "factory-ocsp", S.OcspToFactory)
        self.sup.handshake()
        self.sup.send(S.OcspConfig(store_dir=str(store), max_connections=max_connections, read_timeout=read_timeout, max_age=max_age,
                                   max_per_source=max_per_source))
        ready = self.sup.recv()
        if not (isinstance(ready, S.Ready) and ready.role == "ocsp"):
            self.stop()
            raise AssertionError(f"endpoint role: expected Ready, got {ready!r}")
        self.ready_at = time.perf_counter()

    def connect_feed(self) -> int:
        """The Factory's side of the feed link: handshake, then the endpoint's OcspResume (its durable seq)."""
        self.fac.handshake()
        resume = self.fac.recv()
        if not isinstance(resume, S.OcspResume):
            raise AssertionError(f"endpoint role: expected OcspResume, got {resume!r}")
        return resume.seq

    def stop(self, timeout: float = 15) -> int | None:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                self.sup.send(S.Shutdown())
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)
        for s in (self.sup_s, self.fac_s):
            s.close()
        self.log.close()
        return self.proc.returncode
