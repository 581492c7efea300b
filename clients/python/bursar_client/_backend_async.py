"""The I/O of the asyncio client: asyncio streams, a lock per event loop, ``asyncio.sleep``.

aio.py uses these names; client.py, generated from it by scripts/unasync.py, uses the names of
_backend_sync.py instead (``AsyncConn`` becomes ``Conn``, and so on). Everything else about
the two clients is one source.
"""

from __future__ import annotations

import asyncio
import os
from typing import Optional

from . import _proto as P
from .errors import ProtocolError

# Transport failures after which the request is resent on a new connection.
TRANSPORT_ERRORS = (OSError, EOFError, asyncio.IncompleteReadError, asyncio.TimeoutError)

sleep = asyncio.sleep


def describe(e: BaseException) -> str:
    """A transport failure as error messages show it (``str`` of a timeout is empty)."""
    return repr(e)


class AsyncConn:
    """One Unix-socket connection speaking JSON Lines."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.pid = os.getpid()

    @classmethod
    async def open(cls, path: str, timeout: Optional[float]) -> "AsyncConn":
        reader, writer = await asyncio.wait_for(
            asyncio.open_unix_connection(path, limit=P.MAX_ANSWER_BYTES), timeout
        )
        return cls(reader, writer)

    async def send(self, line: bytes) -> None:
        self.writer.write(line)
        await self.writer.drain()

    async def read(self, timeout: Optional[float]) -> bytes:
        """One answer line; ``timeout`` None waits for ever."""
        try:
            raw = await asyncio.wait_for(self.reader.readuntil(b"\n"), timeout)
        except asyncio.LimitOverrunError as e:
            raise ProtocolError("answer line too long") from e
        except asyncio.IncompleteReadError as e:
            raise EOFError("bursard closed the connection") from e
        return raw

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (OSError, asyncio.CancelledError):
            pass


class AsyncClientIO:
    """The part of AsyncClient that is about its event loop: the lock and closing."""

    _conn: Optional[AsyncConn]

    def _init_io(self) -> None:
        self._lock: Optional[asyncio.Lock] = None  # made lazily, inside the running loop
        self._loop: Optional[asyncio.AbstractEventLoop] = None

    def _get_lock(self) -> asyncio.Lock:
        loop = asyncio.get_running_loop()
        if self._lock is None or self._loop is not loop:
            # First use, or a new event loop (e.g. a second asyncio.run): the old loop's
            # lock and stream cannot be used from this one.
            if self._conn is not None:
                try:
                    self._conn.writer.close()
                except RuntimeError:  # its loop is closed; the socket went with it
                    pass
                self._conn = None
            self._lock = asyncio.Lock()
            self._loop = loop
        return self._lock

    async def close(self) -> None:
        """Close the connection (the next call opens a new one)."""
        await self._drop()

    async def _drop(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            if conn.pid == os.getpid():
                try:
                    await conn.close()
                except RuntimeError:  # made in an event loop that is gone
                    pass
