"""Request building and answer decoding shared by the sync and asyncio clients."""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from decimal import ROUND_CEILING, Decimal
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Sequence, Union

from ._version import __version__
from .errors import BudgetDenied, NotFound, ProtocolError, error_from_answer
from .types import (
    DecisionAnswer,
    ExtendAnswer,
    ObserveAnswer,
    HelloAnswer,
    ReleaseAnswer,
    ReloadAnswer,
    ReplayAnswer,
    ReportAnswer,
    StatusAnswer,
    Usage,
    UsageAnswer,
    UsageLike,
    VerifyAnswer,
    WhatIfAnswer,
    usage_to_wire,
)

log = logging.getLogger("bursar_client")

CLIENT_NAME = f"bursar-python/{__version__}"

# Answers can be long (an exported `policy_applied` event carries the whole price table).
MAX_ANSWER_BYTES = 64 * 1024 * 1024

TimeLike = Union[str, datetime]
Labels = Mapping[str, str]


def default_socket_path() -> str:
    """``$BURSAR_SOCKET``, else ``$XDG_RUNTIME_DIR/bursar.sock``, else ``./bursar.sock``."""
    env = os.environ.get("BURSAR_SOCKET")
    if env:
        return env
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return os.path.join(xdg, "bursar.sock")
    return os.path.join(".", "bursar.sock")


def new_id() -> str:
    """A fresh idempotency id."""
    return str(uuid.uuid4())


def rfc3339(t: TimeLike) -> str:
    if isinstance(t, datetime):
        if t.tzinfo is None:
            raise ValueError("naive datetime: give a timezone (e.g. datetime.now(timezone.utc))")
        return t.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")
    return str(t)


def usd_string(cost: Union[str, int, float, Decimal]) -> str:
    """A provider-reported cost as a plain decimal USD string (no exponent).

    The daemon counts money in whole micro-USD, so numbers are rounded *up* to 6 decimal
    places; a string is sent as it is. A float (LiteLLM's ``response_cost`` in particular) goes
    through its shortest decimal text at a double's 15 significant digits first: its binary
    noise is not money (``90 * 2.5e-6`` is ``0.00022500000000000002``, which is 225 µUSD, not
    226).
    """
    if isinstance(cost, str):
        return cost
    if isinstance(cost, bool):
        raise TypeError("cost must be a number or a decimal string")
    d = Decimal(format(cost, ".15g")) if isinstance(cost, float) else Decimal(cost)
    if not d.is_finite() or d < 0:
        raise ValueError(f"cost must be finite and not negative, got {cost!r}")
    text = format(d.quantize(Decimal("0.000001"), rounding=ROUND_CEILING), "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text or "0"


def _labels(labels: Optional[Labels]) -> Optional[Dict[str, str]]:
    return None if labels is None else dict(labels)


def _estimate(input_tokens: int, max_output_tokens: Optional[int]) -> Dict[str, Any]:
    est: Dict[str, Any] = {"input_tokens": int(input_tokens)}
    if max_output_tokens is not None:
        est["max_output_tokens"] = int(max_output_tokens)
    return est


@dataclass
class Call:
    """One request: its wire object, how to decode the answer, and whether resending it after
    it may already have reached the daemon is safe (idempotent ids or read-only)."""

    body: Dict[str, Any]
    decode: Callable[[Dict[str, Any]], Any]
    resend_safe: bool = True
    wait_s: float = 0.0
    """How long the daemon may keep the request waiting in line (``wait_ms``), on top of the
    client's answer timeout."""

    def answer_timeout(self, timeout: Optional[float]) -> Optional[float]:
        return None if timeout is None else timeout + self.wait_s

    def line(self) -> bytes:
        body = {k: v for k, v in self.body.items() if v is not None}
        return (json.dumps(body, separators=(",", ":"), ensure_ascii=False) + "\n").encode()


def parse_line(raw: bytes) -> Dict[str, Any]:
    try:
        obj = json.loads(raw)
    except ValueError as e:
        raise ProtocolError(f"answer is not JSON: {raw[:200]!r}") from e
    if not isinstance(obj, dict):
        raise ProtocolError(f"answer is not a JSON object: {raw[:200]!r}")
    return obj


def check_ok(obj: Dict[str, Any]) -> Dict[str, Any]:
    """Return the answer, or raise the exception its error names."""
    if obj.get("ok") is False:
        raise error_from_answer(obj)
    if obj.get("ok") is not True and "event" not in obj:
        raise ProtocolError(f"answer without ok: {obj!r}", answer=obj)
    return obj


# --- builders -------------------------------------------------------------------------------


def hello(client: Optional[str]) -> Call:
    return Call({"op": "hello", "client": client or CLIENT_NAME}, HelloAnswer.from_wire)


def record(
    labels: Optional[Labels],
    model: str,
    usage: UsageLike,
    event_id: Optional[str],
    occurred_at: Optional[TimeLike],
    reported_cost_usd: Any,
    headers: Optional[Mapping[str, Any]] = None,
) -> Call:
    eid = event_id or new_id()
    return Call(
        {
            "op": "record",
            "event_id": eid,
            "labels": _labels(labels) or {},
            "model": model,
            "usage": usage_to_wire(usage),
            "occurred_at": None if occurred_at is None else rfc3339(occurred_at),
            "reported_cost_usd": None if reported_cost_usd is None else usd_string(reported_cost_usd),
            "headers": rate_limit_headers(headers),
        },
        lambda a: UsageAnswer.from_wire(a, event_id=eid),
    )


def reserve(
    labels: Optional[Labels],
    model: Optional[str],
    input_tokens: int,
    max_output_tokens: Optional[int],
    ttl_seconds: Optional[int],
    candidates: Optional[Sequence[str]],
    require: Optional[Iterable[str]],
    reservation_id: Optional[str],
    wait_ms: Optional[int] = None,
) -> Call:
    rid = reservation_id or new_id()
    return Call(
        {
            "op": "reserve",
            "reservation_id": rid,
            "labels": _labels(labels) or {},
            "model": model,
            "estimate": _estimate(input_tokens, max_output_tokens),
            "ttl_seconds": ttl_seconds,
            "candidates": None if candidates is None else list(candidates),
            "require": None if require is None else list(require),
            "wait_ms": None if wait_ms is None else int(wait_ms),
        },
        lambda a: DecisionAnswer.from_wire(a, reservation_id=rid),
        wait_s=(wait_ms or 0) / 1000.0,
    )


def check(
    labels: Optional[Labels],
    model: Optional[str],
    input_tokens: int,
    max_output_tokens: Optional[int],
    candidates: Optional[Sequence[str]],
    require: Optional[Iterable[str]],
    wait_ms: Optional[int] = None,
) -> Call:
    return Call(
        {
            "op": "check",
            "labels": _labels(labels) or {},
            "model": model,
            "estimate": _estimate(input_tokens, max_output_tokens),
            "candidates": None if candidates is None else list(candidates),
            "require": None if require is None else list(require),
            "wait_ms": None if wait_ms is None else int(wait_ms),
        },
        DecisionAnswer.from_wire,
        wait_s=(wait_ms or 0) / 1000.0,
    )


def commit(
    reservation_id: str,
    usage: UsageLike,
    event_id: Optional[str],
    labels: Optional[Labels],
    model: Optional[str],
    occurred_at: Optional[TimeLike],
    reported_cost_usd: Any,
    headers: Optional[Mapping[str, Any]] = None,
) -> Call:
    eid = event_id or new_id()
    return Call(
        {
            "op": "commit",
            "reservation_id": reservation_id,
            "event_id": eid,
            "usage": usage_to_wire(usage),
            "labels": _labels(labels),
            "model": model,
            "occurred_at": None if occurred_at is None else rfc3339(occurred_at),
            "reported_cost_usd": None if reported_cost_usd is None else usd_string(reported_cost_usd),
            "headers": rate_limit_headers(headers),
        },
        lambda a: UsageAnswer.from_wire(a, event_id=eid),
    )


# Header names bursar reads (SPEC §10): OpenAI's and Anthropic's rate-limit families.
RATE_LIMIT_PREFIXES = ("x-ratelimit-", "anthropic-ratelimit-")
# LiteLLM forwards a provider's raw headers under this prefix.
_LITELLM_PROVIDER_PREFIX = "llm_provider-"
# At most this many headers are sent (a line is at most 64 KiB).
MAX_RATE_LIMIT_HEADERS = 64


def rate_limit_headers(headers: Optional[Mapping[str, Any]]) -> Optional[Dict[str, str]]:
    """The rate-limit headers among a response's ``headers`` (names lower-cased, LiteLLM's
    ``llm_provider-`` prefix taken off, values as text), or ``None`` when there are none."""
    if not headers:
        return None
    out: Dict[str, str] = {}
    for k, v in headers.items():
        if not isinstance(k, str) or v is None or isinstance(v, (dict, list, tuple, set)):
            continue
        name = k.strip().lower()
        if name.startswith(_LITELLM_PROVIDER_PREFIX):
            name = name[len(_LITELLM_PROVIDER_PREFIX):]
        if name.startswith(RATE_LIMIT_PREFIXES) and len(out) < MAX_RATE_LIMIT_HEADERS:
            out[name] = str(v)
    return out or None


def observe(provider: str, labels: Optional[Labels], quota: Optional[Mapping[str, Any]],
            headers: Optional[Mapping[str, Any]]) -> Call:
    if (quota is None) == (headers is None):
        raise TypeError("give quota (normalised limits) or headers (a response's headers), not both")
    return Call(
        {
            "op": "observe",
            "provider": provider,
            "labels": _labels(labels) or {},
            "quota": None if quota is None else {
                k: {**w, "reset_at": rfc3339(w["reset_at"])} for k, w in quota.items()},
            "headers": None if headers is None else {str(k): str(v) for k, v in headers.items()},
        },
        ObserveAnswer.from_wire,
        resend_safe=False,
    )


def release(reservation_id: str) -> Call:
    return Call({"op": "release", "reservation_id": reservation_id}, ReleaseAnswer.from_wire)


def extend(reservation_id: str, ttl_seconds: int) -> Call:
    return Call(
        {"op": "extend", "reservation_id": reservation_id, "ttl_seconds": int(ttl_seconds)},
        ExtendAnswer.from_wire,
    )


def status(labels: Optional[Labels], budget: Optional[str], limit: Optional[int]) -> Call:
    return Call(
        {"op": "status", "labels": _labels(labels), "budget": budget, "limit": limit},
        StatusAnswer.from_wire,
    )


def verify() -> Call:
    return Call({"op": "verify"}, VerifyAnswer.from_wire)


def reload() -> Call:
    # Reloading twice is harmless for the policy but bumps its version twice: do not resend.
    return Call({"op": "reload"}, ReloadAnswer.from_wire, resend_safe=False)


def replay(
    pricing: Mapping[str, Any], since: Optional[TimeLike], apply: bool, policy: Optional[str] = None
) -> Call:
    """A repricing (``pricing``), or with ``policy`` (a ``bursar.toml`` text) a what-if."""
    return Call(
        {
            "op": "replay",
            "pricing": dict(pricing) if pricing or policy is None else None,
            "policy": policy,
            "since": None if since is None else rfc3339(since),
            "apply": bool(apply) or None,
        },
        ReplayAnswer.from_wire if policy is None else WhatIfAnswer.from_wire,
        resend_safe=not apply,
    )


def report(
    group_by: Optional[Sequence[str]],
    every: Optional[str],
    timezone: Optional[str],
    since: Optional[TimeLike],
    until: Optional[TimeLike],
    labels: Optional[Labels],
) -> Call:
    return Call(
        {
            "op": "report",
            "group_by": None if group_by is None else list(group_by),
            "every": every,
            "timezone": timezone,
            "since": None if since is None else rfc3339(since),
            "until": None if until is None else rfc3339(until),
            "labels": _labels(labels),
        },
        ReportAnswer.from_wire,
    )


def export(since: Optional[TimeLike], until: Optional[TimeLike], labels: Optional[Labels],
           partition: Optional[int] = None) -> Dict[str, Any]:
    return {
        "op": "export",
        "since": None if since is None else rfc3339(since),
        "until": None if until is None else rfc3339(until),
        "labels": _labels(labels),
        "partition": partition,
    }


def tail(from_seq: Optional[int], follow: bool, types: Optional[Iterable[str]] = None,
         partition: Optional[int] = None) -> Dict[str, Any]:
    return {
        "op": "tail",
        "from_seq": from_seq,
        "follow": bool(follow) or None,
        "types": None if types is None else list(types),
        "partition": partition,
    }


def stream_line(body: Dict[str, Any]) -> bytes:
    return Call(body, lambda a: a).line()


# --- what both clients share beyond single requests ----------------------------------------


class Backoff:
    """Exponential backoff inside an overall deadline."""

    def __init__(self, retry_timeout: float) -> None:
        self.deadline = time.monotonic() + max(0.0, retry_timeout)
        self.delay = 0.02

    def next_delay(self) -> Optional[float]:
        """Seconds to sleep before the next try, or None when the deadline has passed."""
        left = self.deadline - time.monotonic()
        if left <= 0:
            return None
        d = min(self.delay, left)
        self.delay = min(self.delay * 2, 0.5)
        return d


class HoldBase:
    """What Hold and AsyncHold share: the reservation's state and the requests it sends."""

    def __init__(
        self,
        client: Any,
        labels: Optional[Mapping[str, str]],
        model: Optional[str],
        input_tokens: int,
        max_output_tokens: Optional[int],
        ttl_seconds: Optional[int],
        candidates: Optional[Sequence[str]],
        require: Optional[Iterable[str]],
        reservation_id: Optional[str],
        wait_ms: Optional[int] = None,
    ) -> None:
        self.client = client
        self.labels = dict(labels or {})
        self.requested_model = model
        self._args = dict(
            input_tokens=input_tokens,
            max_output_tokens=max_output_tokens,
            ttl_seconds=ttl_seconds,
            candidates=candidates,
            require=require,
            wait_ms=wait_ms,
        )
        self.reservation_id = reservation_id or new_id()
        self.decision: Optional[DecisionAnswer] = None
        self.answer: Optional[UsageAnswer] = None
        self.released = False

    @property
    def model(self) -> Optional[str]:
        """The model to call: the requested one, or the fallback candidate the daemon chose."""
        return self.decision.model if self.decision is not None else self.requested_model

    @property
    def warned(self) -> bool:
        """True when the call was allowed but brings a budget near its limit."""
        return self.decision is not None and self.decision.decision == "warn"

    @property
    def hold_micros(self) -> int:
        return self.decision.hold_micros if self.decision is not None else 0

    @property
    def expires_at(self) -> Optional[str]:
        return self.decision.expires_at if self.decision is not None else None

    @property
    def committed(self) -> bool:
        return self.answer is not None

    def _reserve_call(self) -> Call:
        a = self._args
        return reserve(self.labels, self.requested_model, a["input_tokens"],
                         a["max_output_tokens"], a["ttl_seconds"], a["candidates"], a["require"],
                         self.reservation_id, a.get("wait_ms"))

    def _entered(self, decision: DecisionAnswer) -> None:
        self.decision = decision
        if not decision.allowed:
            raise BudgetDenied(decision)

    def _commit_call(self, usage: Optional[UsageLike], fields: Mapping[str, int],
                     event_id: Optional[str], occurred_at: Any, reported_cost_usd: Any,
                     headers: Optional[Mapping[str, Any]] = None) -> Call:
        if self.decision is None:
            raise RuntimeError("hold not entered: use it in a `with` statement")
        if self.answer is not None:
            raise RuntimeError(f"hold {self.reservation_id} was already committed")
        if self.released:
            raise RuntimeError(f"hold {self.reservation_id} was already released")
        if usage is None:
            usage = Usage(**fields)
        elif fields:
            raise TypeError("give usage either as an object or as keyword arguments, not both")
        return commit(self.reservation_id, usage, event_id, self.labels, self.model,
                        occurred_at, reported_cost_usd, headers)

    def _done(self) -> bool:
        return self.decision is None or self.answer is not None or self.released

    def _release_failed(self, e: BaseException) -> None:
        if isinstance(e, NotFound):
            return  # expired, or already gone: nothing is held
        log.warning("bursar: could not release hold %s (it expires at %s): %s",
                    self.reservation_id, self.expires_at, e)

    def __repr__(self) -> str:
        state = "committed" if self.committed else "released" if self.released else "live"
        return f"<Hold {self.reservation_id} model={self.model!r} {state}>"
