"""The I/O of the blocking client: a Unix socket, a thread lock, ``time.sleep``.

client.py is generated from aio.py by scripts/unasync.py, which renames the names of
_backend_async.py to these (``AsyncConn`` becomes ``Conn``, and so on): keep the two modules'
names and signatures alike.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from typing import Optional

from . import _proto as P
from .errors import ProtocolError

# Transport failures after which the request is resent on a new connection.
TRANSPORT_ERRORS = (OSError, EOFError)

sleep = time.sleep


def describe(e: BaseException) -> str:
    """A transport failure as error messages show it."""
    return str(e)


class Conn:
    """One Unix-socket connection speaking JSON Lines."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.rfile = sock.makefile("rb")
        self.pid = os.getpid()

    @classmethod
    def open(cls, path: str, timeout: Optional[float]) -> "Conn":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(path)
            return cls(sock)
        except BaseException:
            sock.close()
            raise

    def send(self, line: bytes) -> None:
        self.sock.sendall(line)

    def read(self, timeout: Optional[float]) -> bytes:
        """One answer line; ``timeout`` None waits for ever."""
        if self.sock.gettimeout() != timeout:
            self.sock.settimeout(timeout)
        raw = self.rfile.readline(P.MAX_ANSWER_BYTES + 1)
        if not raw:
            raise EOFError("bursard closed the connection")
        if not raw.endswith(b"\n"):
            if len(raw) > P.MAX_ANSWER_BYTES:
                raise ProtocolError("answer line too long")
            raise EOFError("bursard closed the connection mid-answer")
        return raw

    def close(self) -> None:
        try:
            self.rfile.close()
        finally:
            self.sock.close()


class ClientIO:
    """The part of Client that is about threads: one lock around the connection, and closing."""

    _conn: Optional[Conn]

    def _init_io(self) -> None:
        self._lock = threading.Lock()

    def _get_lock(self) -> threading.Lock:
        return self._lock

    def close(self) -> None:
        """Close the connection (the next call opens a new one)."""
        with self._lock:
            self._drop()

    def _drop(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            if conn.pid == os.getpid():
                try:
                    conn.close()
                except OSError:
                    pass
