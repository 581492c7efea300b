"""asyncio client for bursard: the same surface as :class:`bursar_client.Client`, awaitable."""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any, AsyncIterator, Iterable, Mapping, Optional, Sequence

from . import _proto as P
from .client import _Backoff, _HoldBase
from .errors import BursarError, Disconnected, Overloaded, ProtocolError
from .types import (
    DecisionAnswer,
    Event,
    ExtendAnswer,
    HelloAnswer,
    ReleaseAnswer,
    ReloadAnswer,
    ReplayAnswer,
    StatusAnswer,
    UsageAnswer,
    UsageLike,
    VerifyAnswer,
)

log = logging.getLogger("bursar_client")

_TRANSPORT_ERRORS = (OSError, EOFError, asyncio.IncompleteReadError, asyncio.TimeoutError)


class _AConn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.pid = os.getpid()

    @classmethod
    async def open(cls, path: str, timeout: Optional[float]) -> "_AConn":
        reader, writer = await asyncio.wait_for(
            asyncio.open_unix_connection(path, limit=P.MAX_ANSWER_BYTES), timeout
        )
        return cls(reader, writer)

    async def send(self, line: bytes) -> None:
        self.writer.write(line)
        await self.writer.drain()

    async def read(self, timeout: Optional[float]) -> bytes:
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


class AsyncClient:
    """An asyncio connection to bursard, safe to share between tasks of one event loop.

    Same arguments, methods and retry behaviour as :class:`bursar_client.Client`; every
    method is a coroutine, ``export``/``tail`` are async iterators and ``hold`` is an async
    context manager::

        async with AsyncClient() as bursar:
            async with bursar.hold(labels, "gpt-4o", input_tokens=900) as h:
                ...
                await h.commit(Usage(input_tokens=900, output_tokens=120))
    """

    def __init__(
        self,
        socket_path: Optional[str] = None,
        *,
        timeout: Optional[float] = 30.0,
        retry_timeout: float = 10.0,
        client_name: Optional[str] = None,
    ) -> None:
        self.socket_path = socket_path if socket_path is not None else P.default_socket_path()
        self.timeout = timeout
        self.retry_timeout = retry_timeout
        self.client_name = client_name
        # Whether a daemon ever answered: until one has, a failed connect fails at once (a
        # wrong socket path is not worth `retry_timeout` of waiting); after, it is retried
        # across a restart.
        self._reached = False
        self._lock: Optional[asyncio.Lock] = None  # made lazily, inside the running loop
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._conn: Optional[_AConn] = None

    def __repr__(self) -> str:
        return f"AsyncClient({self.socket_path!r})"

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

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

    async def _call(self, call: P.Call) -> Any:
        line = call.line()
        backoff = _Backoff(self.retry_timeout)
        async with self._get_lock():
            while True:
                sent = False
                try:
                    if self._conn is not None and self._conn.pid != os.getpid():
                        self._conn = None
                    if self._conn is None:
                        self._conn = await _AConn.open(self.socket_path, self.timeout)
                    await self._conn.send(line)
                    sent = True
                    answer = P.parse_line(await self._conn.read(self.timeout))
                    self._reached = True
                except _TRANSPORT_ERRORS as e:
                    await self._drop()
                    if sent and not call.resend_safe:
                        raise Disconnected(
                            f"connection to {self.socket_path} lost during `{call.body['op']}`; "
                            f"it may or may not have been applied: {e!r}"
                        ) from e
                    never_reached = not self._reached and not sent
                    delay = (
                        None
                        if isinstance(e, PermissionError) or never_reached
                        else backoff.next_delay()
                    )
                    if delay is None:
                        if never_reached:
                            raise Disconnected(
                                f"cannot reach bursard at {self.socket_path}: {e!r} (is the "
                                f"daemon running? --socket / BURSAR_SOCKET pick the socket)"
                            ) from e
                        raise Disconnected(
                            f"cannot reach bursard at {self.socket_path} (retried for up to "
                            f"{self.retry_timeout:g}s): {e!r}"
                        ) from e
                    log.debug("bursar: %r; retrying in %.2fs", e, delay)
                    await asyncio.sleep(delay)
                    continue
                except ProtocolError:
                    await self._drop()
                    raise
                except asyncio.CancelledError:
                    # An answer may be on its way: this stream can no longer be trusted.
                    await self._drop()
                    raise
                try:
                    return call.decode(P.check_ok(answer))
                except Overloaded:
                    delay = backoff.next_delay() if call.resend_safe else None
                    if delay is None:
                        raise
                    await asyncio.sleep(delay)

    async def _stream(self, body: Mapping[str, Any]) -> AsyncIterator[Event]:
        backoff = _Backoff(self.retry_timeout)
        follow = bool(body.get("follow"))
        while True:
            try:
                conn = await _AConn.open(self.socket_path, self.timeout)
                break
            except _TRANSPORT_ERRORS as e:
                delay = backoff.next_delay()
                if delay is None:
                    raise Disconnected(f"bursard at {self.socket_path} unreachable: {e!r}") from e
                await asyncio.sleep(delay)
        try:
            await conn.send(P.stream_line(dict(body)))
            while True:
                try:
                    obj = P.parse_line(await conn.read(None if follow else self.timeout))
                except _TRANSPORT_ERRORS as e:
                    raise Disconnected(f"stream from bursard interrupted: {e!r}") from e
                if "event" in obj:
                    yield Event.from_wire(obj["event"])
                    continue
                P.check_ok(obj)
                if obj.get("end"):
                    return
                raise ProtocolError(f"unexpected line in stream: {obj!r}", answer=obj)
        finally:
            await conn.close()

    # --- operations (see Client for the documentation) ------------------------------------

    async def hello(self, client: Optional[str] = None) -> HelloAnswer:
        return await self._call(P.hello(client or self.client_name))

    async def record(
        self,
        labels: Optional[Mapping[str, str]],
        model: str,
        usage: UsageLike,
        *,
        event_id: Optional[str] = None,
        occurred_at: Optional[P.TimeLike] = None,
        reported_cost_usd: Any = None,
    ) -> UsageAnswer:
        return await self._call(
            P.record(labels, model, usage, event_id, occurred_at, reported_cost_usd))

    async def reserve(
        self,
        labels: Optional[Mapping[str, str]],
        model: Optional[str] = None,
        *,
        input_tokens: int = 0,
        max_output_tokens: Optional[int] = None,
        ttl_seconds: Optional[int] = None,
        candidates: Optional[Sequence[str]] = None,
        require: Optional[Iterable[str]] = None,
        reservation_id: Optional[str] = None,
    ) -> DecisionAnswer:
        return await self._call(
            P.reserve(labels, model, input_tokens, max_output_tokens, ttl_seconds, candidates,
                      require, reservation_id))

    async def check(
        self,
        labels: Optional[Mapping[str, str]],
        model: Optional[str] = None,
        *,
        input_tokens: int = 0,
        max_output_tokens: Optional[int] = None,
        candidates: Optional[Sequence[str]] = None,
        require: Optional[Iterable[str]] = None,
    ) -> DecisionAnswer:
        return await self._call(
            P.check(labels, model, input_tokens, max_output_tokens, candidates, require))

    async def commit(
        self,
        reservation_id: str,
        usage: UsageLike,
        *,
        event_id: Optional[str] = None,
        labels: Optional[Mapping[str, str]] = None,
        model: Optional[str] = None,
        occurred_at: Optional[P.TimeLike] = None,
        reported_cost_usd: Any = None,
    ) -> UsageAnswer:
        return await self._call(
            P.commit(reservation_id, usage, event_id, labels, model, occurred_at,
                     reported_cost_usd))

    async def release(self, reservation_id: str) -> ReleaseAnswer:
        return await self._call(P.release(reservation_id))

    async def extend(self, reservation_id: str, ttl_seconds: int) -> ExtendAnswer:
        return await self._call(P.extend(reservation_id, ttl_seconds))

    async def status(
        self,
        labels: Optional[Mapping[str, str]] = None,
        budget: Optional[str] = None,
        limit: Optional[int] = None,
    ) -> StatusAnswer:
        return await self._call(P.status(labels, budget, limit))

    async def verify(self) -> VerifyAnswer:
        return await self._call(P.verify())

    async def reload(self) -> ReloadAnswer:
        return await self._call(P.reload())

    async def replay(
        self, pricing: Mapping[str, Any], since: Optional[P.TimeLike] = None, apply: bool = False
    ) -> ReplayAnswer:
        return await self._call(P.replay(pricing, since, apply))

    def export(
        self,
        since: Optional[P.TimeLike] = None,
        until: Optional[P.TimeLike] = None,
        labels: Optional[Mapping[str, str]] = None,
    ) -> AsyncIterator[Event]:
        """``async for event in client.export(...)``."""
        return self._stream(P.export(since, until, labels))

    def tail(self, from_seq: Optional[int] = None, follow: bool = False) -> AsyncIterator[Event]:
        return self._stream(P.tail(from_seq, follow))

    def hold(
        self,
        labels: Optional[Mapping[str, str]],
        model: Optional[str] = None,
        *,
        input_tokens: int = 0,
        max_output_tokens: Optional[int] = None,
        ttl_seconds: Optional[int] = None,
        candidates: Optional[Sequence[str]] = None,
        require: Optional[Iterable[str]] = None,
        reservation_id: Optional[str] = None,
    ) -> "AsyncHold":
        """``async with client.hold(...) as h: ...; await h.commit(usage)``."""
        return AsyncHold(self, labels, model, input_tokens, max_output_tokens, ttl_seconds,
                         candidates, require, reservation_id)


class AsyncHold(_HoldBase):
    """A reservation used as an async context manager (see :meth:`AsyncClient.hold`)."""

    async def __aenter__(self) -> "AsyncHold":
        self._entered(await self.client._call(self._reserve_call()))
        return self

    async def commit(
        self,
        usage: Optional[UsageLike] = None,
        *,
        event_id: Optional[str] = None,
        occurred_at: Optional[P.TimeLike] = None,
        reported_cost_usd: Any = None,
        **usage_fields: int,
    ) -> UsageAnswer:
        call = self._commit_call(usage, usage_fields, event_id, occurred_at, reported_cost_usd)
        self.answer = await self.client._call(call)
        return self.answer

    async def release(self) -> Optional[ReleaseAnswer]:
        if self._done():
            return None
        ans = await self.client.release(self.reservation_id)
        self.released = True
        return ans

    async def extend(self, ttl_seconds: int) -> ExtendAnswer:
        ans = await self.client.extend(self.reservation_id, ttl_seconds)
        if self.decision is not None:
            self.decision.expires_at = ans.expires_at
        return ans

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if self._done():
            return
        try:
            await self.release()
        except (BursarError, OSError) as e:
            self.released = True
            self._release_failed(e)
