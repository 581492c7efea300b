"""asyncio client for bursard: ``AsyncClient``, every method a coroutine."""

# client.py is generated from this file by scripts/unasync.py: edit this one, then run
# `python3 clients/python/scripts/unasync.py` (tests/test_codegen.py fails until you do).

from __future__ import annotations

import logging
import os
from typing import Any, AsyncIterator, Iterable, Mapping, Optional, Sequence

from . import _proto as P
from ._backend_async import TRANSPORT_ERRORS, AsyncClientIO, AsyncConn, describe, sleep
from .errors import BursarError, Disconnected, Overloaded, ProtocolError
from .types import (
    DecisionAnswer,
    Event,
    ExtendAnswer,
    ObserveAnswer,
    HelloAnswer,
    ReleaseAnswer,
    ReloadAnswer,
    ReplayAnswer,
    ReportAnswer,
    StatusAnswer,
    UsageAnswer,
    UsageLike,
    VerifyAnswer,
    WhatIfAnswer,
)

log = logging.getLogger("bursar_client")


class AsyncClient(AsyncClientIO):
    """An asyncio connection to bursard, safe to share between the tasks of one event loop.

    Args:
        socket_path: the daemon's socket; default ``$BURSAR_SOCKET``, else
            ``$XDG_RUNTIME_DIR/bursar.sock``, else ``./bursar.sock``.
        timeout: seconds to wait for one answer before treating the connection as dead.
        retry_timeout: how long to keep reconnecting and resending when the daemon is
            unreachable, drops the connection, or answers ``overloaded``. Requests carry
            idempotency ids (generated when not given), so a resent request that had already
            been applied is answered as a duplicate and never counted twice. Until a daemon
            has answered this client once, a failed connection fails at once (a wrong socket
            path is not worth waiting for); after that, it is retried across a restart.
        client_name: sent with ``hello``.

    All methods may raise :class:`~bursar_client.BursarError` subclasses. ``export`` and
    ``tail`` are iterators on a connection of their own; ``hold`` is a context manager::

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
        self._conn: Optional[AsyncConn] = None
        self._init_io()

    # --- connection ---------------------------------------------------------------------

    def __repr__(self) -> str:
        return f"AsyncClient({self.socket_path!r})"

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def _call(self, call: P.Call) -> Any:
        line = call.line()
        backoff = P.Backoff(self.retry_timeout)
        async with self._get_lock():
            while True:
                sent = False
                try:
                    if self._conn is not None and self._conn.pid != os.getpid():
                        self._conn = None  # inherited across fork: never share a stream
                    if self._conn is None:
                        self._conn = await AsyncConn.open(self.socket_path, self.timeout)
                    await self._conn.send(line)
                    # From here on the daemon may have applied the request. (A failed send
                    # delivered nothing: a closed peer cannot read a partial line.)
                    sent = True
                    answer = P.parse_line(
                        await self._conn.read(call.answer_timeout(self.timeout)))
                    self._reached = True
                except TRANSPORT_ERRORS as e:
                    await self._drop()
                    if sent and not call.resend_safe:
                        raise Disconnected(
                            f"connection to {self.socket_path} lost during `{call.body['op']}`; "
                            f"it may or may not have been applied: {describe(e)}"
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
                                f"cannot reach bursard at {self.socket_path}: {describe(e)} (is "
                                f"the daemon running? --socket / BURSAR_SOCKET pick the socket)"
                            ) from e
                        raise Disconnected(
                            f"cannot reach bursard at {self.socket_path} (retried for up to "
                            f"{self.retry_timeout:g}s): {describe(e)}"
                        ) from e
                    log.debug("bursar: %s; retrying in %.2fs", describe(e), delay)
                    await sleep(delay)
                    continue
                except BaseException:
                    # A malformed answer, or an interruption (task cancelled, Ctrl-C) while an
                    # answer may be on its way: this stream can no longer be trusted.
                    await self._drop()
                    raise
                try:
                    return call.decode(P.check_ok(answer))
                except Overloaded:
                    delay = backoff.next_delay() if call.resend_safe else None
                    if delay is None:
                        raise
                    await sleep(delay)

    async def _stream(self, body: Mapping[str, Any]) -> AsyncIterator[Event]:
        """Send a streaming request on its own connection and yield its events."""
        backoff = P.Backoff(self.retry_timeout)
        follow = bool(body.get("follow"))
        while True:
            try:
                conn = await AsyncConn.open(self.socket_path, self.timeout)
                break
            except TRANSPORT_ERRORS as e:
                delay = backoff.next_delay()
                if delay is None:
                    raise Disconnected(
                        f"bursard at {self.socket_path} unreachable: {describe(e)}"
                    ) from e
                await sleep(delay)
        try:
            await conn.send(P.stream_line(dict(body)))
            while True:
                try:
                    obj = P.parse_line(await conn.read(None if follow else self.timeout))
                except TRANSPORT_ERRORS as e:
                    raise Disconnected(f"stream from bursard interrupted: {describe(e)}") from e
                if "event" in obj:
                    yield Event.from_wire(obj["event"])
                    continue
                P.check_ok(obj)
                if obj.get("end"):
                    return
                raise ProtocolError(f"unexpected line in stream: {obj!r}", answer=obj)
        finally:
            await conn.close()

    # --- operations -----------------------------------------------------------------------

    async def hello(self, client: Optional[str] = None) -> HelloAnswer:
        """Server name, protocol version and policy version."""
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
        headers: Optional[Mapping[str, Any]] = None,
    ) -> UsageAnswer:
        """Record usage that already happened (always kept, even past a limit).

        ``headers``: the provider response's headers; its rate-limit headers are sent along
        and update the ``[[quota]]`` that governs the call (SPEC §10)."""
        return await self._call(
            P.record(labels, model, usage, event_id, occurred_at, reported_cost_usd, headers)
        )

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
        wait_ms: Optional[int] = None,
    ) -> DecisionAnswer:
        """Hold the worst case of a call. A denial is returned (``decision == "deny"``), not raised.

        ``wait_ms`` (at most 60000): wait in line that long when only limits that free up by
        themselves stand in the way (concurrency, rolling windows, quotas); the answer's
        ``waited_ms`` says how long it waited."""
        return await self._call(
            P.reserve(labels, model, input_tokens, max_output_tokens, ttl_seconds, candidates,
                      require, reservation_id, wait_ms)
        )

    async def check(
        self,
        labels: Optional[Mapping[str, str]],
        model: Optional[str] = None,
        *,
        input_tokens: int = 0,
        max_output_tokens: Optional[int] = None,
        candidates: Optional[Sequence[str]] = None,
        require: Optional[Iterable[str]] = None,
        wait_ms: Optional[int] = None,
    ) -> DecisionAnswer:
        """What ``reserve`` would decide, without holding or logging anything (with
        ``wait_ms``: once it fits, or when that time is up)."""
        return await self._call(
            P.check(labels, model, input_tokens, max_output_tokens, candidates, require, wait_ms)
        )

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
        headers: Optional[Mapping[str, Any]] = None,
    ) -> UsageAnswer:
        """Record the actual usage of a reserved call and release its hold.

        ``labels`` and ``model`` are used only if the daemon never saw the reservation.
        ``headers``: the provider response's headers; its rate-limit headers are sent along
        and update the ``[[quota]]`` that governs the call (SPEC §10).
        """
        return await self._call(
            P.commit(reservation_id, usage, event_id, labels, model, occurred_at, reported_cost_usd,
                     headers)
        )

    async def observe(
        self,
        provider: str,
        labels: Optional[Mapping[str, str]] = None,
        *,
        quota: Optional[Mapping[str, Mapping[str, Any]]] = None,
        headers: Optional[Mapping[str, Any]] = None,
    ) -> ObserveAnswer:
        """Tell the daemon what ``provider`` said about its rate limits: a response's raw
        ``headers``, or ``quota={"requests": {"limit": .., "remaining": .., "reset_at": ..}}``
        (also ``tokens``, ``input_tokens``, ``output_tokens``). ``labels`` pick the quota."""
        return await self._call(P.observe(provider, labels, quota, headers))

    async def release(self, reservation_id: str) -> ReleaseAnswer:
        """Cancel a hold (``NotFound`` if it is not live)."""
        return await self._call(P.release(reservation_id))

    async def extend(self, reservation_id: str, ttl_seconds: int) -> ExtendAnswer:
        """Give a live hold a new lifetime of ``ttl_seconds`` from now."""
        return await self._call(P.extend(reservation_id, ttl_seconds))

    async def status(
        self,
        labels: Optional[Mapping[str, str]] = None,
        budget: Optional[str] = None,
        limit: Optional[int] = None,
    ) -> StatusAnswer:
        """Budget buckets, most utilized first, at most ``limit`` (default 1000); ``total`` and
        ``truncated`` say what was left out. ``labels`` keeps buckets carrying each label in their
        scope or pinned by their budget's ``match``; an unknown ``budget`` raises ``NotFound``."""
        return await self._call(P.status(labels, budget, limit))

    async def verify(self) -> VerifyAnswer:
        """Check the log's hash chain."""
        return await self._call(P.verify())

    async def reload(self) -> ReloadAnswer:
        """Re-read the policy file (admin only)."""
        return await self._call(P.reload())

    async def replay(
        self, pricing: Mapping[str, Any], since: Optional[P.TimeLike] = None, apply: bool = False
    ) -> ReplayAnswer:
        """Refold the log under new prices; with ``apply`` make them current (admin only)."""
        return await self._call(P.replay(pricing, since, apply))

    async def report(
        self,
        group_by: Optional[Sequence[str]] = None,
        every: Optional[str] = None,
        *,
        timezone: Optional[str] = None,
        since: Optional[P.TimeLike] = None,
        until: Optional[P.TimeLike] = None,
        labels: Optional[Mapping[str, str]] = None,
    ) -> ReportAnswer:
        """Spend per ``every`` (``hour``, ``day``, ``week``, ``month``) grouped by labels."""
        return await self._call(P.report(group_by, every, timezone, since, until, labels))

    async def what_if(self, policy: str, since: Optional[P.TimeLike] = None) -> WhatIfAnswer:
        """What the policy ``policy`` (the text of a ``bursar.toml``) would have done with the
        log's requests since ``since``: the reservations it would have denied, the buckets it
        would have exhausted, each budget's peak. Changes nothing."""
        return await self._call(P.replay({}, since, False, policy))

    def export(
        self,
        since: Optional[P.TimeLike] = None,
        until: Optional[P.TimeLike] = None,
        labels: Optional[Mapping[str, str]] = None,
        partition: Optional[int] = None,
    ) -> AsyncIterator[Event]:
        """``async for event in client.export(...)``: logged events (on a connection of its own,
        so other calls may interleave). On a cluster node, every partition's log one after the
        other (each event's ``partition`` says whose), or only ``partition``'s."""
        return self._stream(P.export(since, until, labels, partition))

    def tail(
        self,
        from_seq: Optional[int] = None,
        follow: bool = False,
        types: Optional[Iterable[str]] = None,
        partition: Optional[int] = None,
    ) -> AsyncIterator[Event]:
        """Events from ``from_seq`` (``async for``); with ``follow``, keep waiting for new ones;
        with ``types`` (e.g. ``["budget_warned", "budget_exhausted"]``), only those. On a
        cluster node, only ``partition``'s log (required with ``from_seq``)."""
        return self._stream(P.tail(from_seq, follow, types, partition))

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
        wait_ms: Optional[int] = None,
    ) -> "AsyncHold":
        """A context manager around one reserved call::

            async with client.hold({"team": "search"}, "gpt-4o", input_tokens=1200) as h:
                reply = call_model(h.model)
                await h.commit(Usage(input_tokens=..., output_tokens=...))

        Entering reserves (raising :class:`~bursar_client.BudgetDenied` when refused; with
        ``wait_ms``, after waiting in line up to that long); leaving without a commit, or by an
        exception, releases the hold.
        """
        return AsyncHold(
            self, labels, model, input_tokens, max_output_tokens, ttl_seconds, candidates,
            require, reservation_id, wait_ms,
        )


class AsyncHold(P.HoldBase):
    """A reservation used as a context manager (see :meth:`AsyncClient.hold`)."""

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
        headers: Optional[Mapping[str, Any]] = None,
        **usage_fields: int,
    ) -> UsageAnswer:
        """Record the call's actual usage (a :class:`Usage`, a mapping, or keyword fields);
        ``headers``: the response's headers (its rate-limit headers are sent along)."""
        call = self._commit_call(usage, usage_fields, event_id, occurred_at, reported_cost_usd,
                                 headers)
        self.answer = await self.client._call(call)
        return self.answer

    async def release(self) -> Optional[ReleaseAnswer]:
        """Release the hold now (also done automatically on exit without a commit)."""
        if self._done():
            return None
        ans = await self.client.release(self.reservation_id)
        self.released = True
        return ans

    async def extend(self, ttl_seconds: int) -> ExtendAnswer:
        """Keep the hold alive for ``ttl_seconds`` more (long streaming calls)."""
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
