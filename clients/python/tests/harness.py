"""Test harness: real bursard processes in temp dirs, a lossy proxy, a scripted fake daemon."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Callable, List, Optional

HERE = Path(__file__).resolve().parent
PY_ROOT = HERE.parent                      # clients/python
REPO_ROOT = PY_ROOT.parent.parent          # the repository

if str(PY_ROOT) not in sys.path:
    sys.path.insert(0, str(PY_ROOT))

# Budgets with real limits (SPEC §4). Prices come from the daemon's built-in table:
# gpt-4o-mini 0.15 / 0.60 USD per Mtok (cached 0.075), gpt-4o 2.50 / 10.00 (cached 1.25).
POLICY = """
[daemon]
reservation_ttl_seconds = 60
unknown_models = "deny"

[tiers]
default = "small"
patterns = [ { match = "gpt-4o-mini*", tier = "small" }, { match = "gpt-4o*", tier = "frontier" } ]
[tiers.caps.frontier]
max_call_usd = 0.20

[[budget]]
id = "team-daily"
match = { org = "acme" }
group_by = ["team"]
window = "fixed"
window_seconds = 86400
max_usd = 0.05
warn_at = 0.8
enforce = "deny"

[[budget]]
id = "gpu-seats"
match = { pool = "gpu" }
max_concurrent = 2

# A provider's rate limits on one account: what its headers say binds (SPEC §10).
[[quota]]
id = "openai-prod"
provider = "openai"
match = { account = "prod" }
"""


def bursard_path() -> Path:
    env = os.environ.get("BURSARD")
    target = Path(os.environ.get("CARGO_TARGET_DIR") or REPO_ROOT / "target")
    path = Path(env) if env else target.resolve() / "debug" / "bursard"
    if not path.is_file():
        raise RuntimeError(
            f"bursard binary not found at {path}: run `cargo build -p bursard` first "
            "(or set BURSARD=/path/to/bursard)"
        )
    return path


def team() -> str:
    """A fresh team label, so each test has buckets of its own."""
    return "t-" + uuid.uuid4().hex[:10]


class Daemon:
    """A bursard on a temp data dir and socket, with the test policy."""

    def __init__(self, policy: str = POLICY) -> None:
        # Short path: Unix socket paths are limited to ~107 bytes.
        self.dir = Path(tempfile.mkdtemp(prefix="bursar-py-"))
        self.socket = str(self.dir / "d.sock")
        self.data_dir = str(self.dir / "data")
        self.config = self.dir / "bursar.toml"
        self.config.write_text(policy)
        self.log_path = self.dir / "bursard.log"
        self.proc: Optional[subprocess.Popen] = None

    def start(self, wait: bool = True) -> "Daemon":
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [str(bursard_path()), "--socket", self.socket, "--data-dir", self.data_dir,
             "--config", str(self.config)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=str(self.dir),
        )
        log.close()
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"bursard exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                    s.settimeout(2)
                    s.connect(self.socket)
                    s.sendall(b'{"op":"hello","client":"tests"}\n')
                    answer = json.loads(s.makefile("rb").readline())
                    if answer.get("ok") and answer.get("protocol") == 1:
                        return
                    last = answer
            except (OSError, ValueError) as e:
                last = e
            time.sleep(0.02)
        raise RuntimeError(f"bursard not ready after {timeout}s ({last}):\n{self.log()}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill9(self) -> None:
        self.stop(signal.SIGKILL)

    def restart(self, sig: int = signal.SIGTERM) -> None:
        self.stop(sig)
        self.start()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class LossyProxy:
    """Forwards JSON Lines between clients and bursard; can lose answers.

    ``drop_answers(n)``: for the next n requests, the request reaches the daemon (which applies
    it) but the client's connection is closed before it sees the answer — a daemon crash or a
    broken pipe at the worst moment.
    """

    def __init__(self, upstream: str, path: str) -> None:
        self.upstream = upstream
        self.path = path
        self.requests: List[dict] = []
        self._drop = 0
        self._lock = threading.Lock()
        self._srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._srv.bind(path)
        self._srv.listen(16)
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def drop_answers(self, n: int) -> None:
        with self._lock:
            self._drop = n

    def _take_drop(self) -> bool:
        with self._lock:
            if self._drop > 0:
                self._drop -= 1
                return True
            return False

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._srv.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            up = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            up.connect(self.upstream)
        except OSError:
            conn.close()
            return
        cin, uin = conn.makefile("rb"), up.makefile("rb")
        try:
            while True:
                line = cin.readline()
                if not line:
                    return
                with self._lock:
                    self.requests.append(json.loads(line))
                up.sendall(line)
                answer = uin.readline()
                if not answer:
                    return
                if self._take_drop():
                    return  # the daemon has applied it; the client never hears
                conn.sendall(answer)
        except OSError:
            return
        finally:
            for f in (cin, uin, conn, up):
                try:
                    f.close()
                except OSError:
                    pass

    def close(self) -> None:
        self._closed = True
        self._srv.close()


class FakeDaemon:
    """A scripted stand-in for bursard: ``respond(request) -> answer dict``."""

    def __init__(self, path: str, respond: Callable[[dict], dict]) -> None:
        self.path = path
        self.respond = respond
        self.requests: List[dict] = []
        self._srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._srv.bind(path)
        self._srv.listen(8)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._srv.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        f = conn.makefile("rb")
        try:
            for line in f:
                req = json.loads(line)
                self.requests.append(req)
                conn.sendall((json.dumps(self.respond(req)) + "\n").encode())
        except OSError:
            pass
        finally:
            f.close()
            conn.close()

    def close(self) -> None:
        self._srv.close()
