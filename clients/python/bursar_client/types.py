"""Typed answers of the bursar protocol (SPEC §6).

Money is in integer micro-USD (``*_micros``; 1 USD = 1 000 000), as on the wire. Every answer
keeps the decoded JSON object in ``raw`` (fields a newer daemon adds are not lost), and
unknown fields never make decoding fail.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Dict, List, Mapping, Optional, Type, TypeVar, Union

__all__ = [
    "Usage",
    "BudgetReport",
    "HelloAnswer",
    "UsageAnswer",
    "Skipped",
    "Reason",
    "DecisionAnswer",
    "ReleaseAnswer",
    "ExtendAnswer",
    "ObserveAnswer",
    "QuotaReport",
    "StatusAnswer",
    "Tier",
    "VerifyAnswer",
    "ReloadAnswer",
    "DiffRow",
    "ReplayAnswer",
    "Event",
    "micros_to_usd",
]

MICROS_PER_USD = 1_000_000


def micros_to_usd(micros: int) -> Decimal:
    """Exact conversion of micro-USD to a USD :class:`~decimal.Decimal`."""
    return Decimal(micros).scaleb(-6)


@dataclass
class Usage:
    """Token and request counts of one call.

    ``input_tokens`` are the **uncached** input tokens; cache reads go to
    ``cached_input_tokens`` and cache writes to ``cache_write_tokens``, each in addition.
    """

    input_tokens: int = 0
    output_tokens: int = 0
    cached_input_tokens: int = 0
    cache_write_tokens: int = 0
    requests: int = 1

    def to_wire(self) -> Dict[str, int]:
        return dataclasses.asdict(self)

    @property
    def total_tokens(self) -> int:
        return (self.input_tokens + self.output_tokens + self.cached_input_tokens
                + self.cache_write_tokens)


UsageLike = Union[Usage, Mapping[str, int]]


def usage_to_wire(usage: UsageLike) -> Dict[str, Any]:
    """A :class:`Usage` or a mapping with the wire's field names, as a wire object.

    A mapping is sent as it is, so a misspelt key is refused by the daemon (``bad_request``
    naming the field) instead of silently counting as zero.
    """
    if isinstance(usage, Usage):
        return usage.to_wire()
    if isinstance(usage, Mapping):
        return dict(usage)
    raise TypeError(f"usage must be a bursar_client.Usage or a mapping, not {type(usage).__name__}")


T = TypeVar("T")


def _build(cls: Type[T], obj: Mapping[str, Any], **overrides: Any) -> T:
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    kwargs = {k: v for k, v in obj.items() if k in names}
    kwargs.update(overrides)
    if "raw" in names:
        kwargs["raw"] = dict(obj)
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field is missing
        from .errors import ProtocolError

        raise ProtocolError(f"malformed {cls.__name__} answer ({e}): {dict(obj)!r}") from None


@dataclass
class BudgetReport:
    """One budget bucket as the daemon reports it.

    Each limit the budget has comes with what remains of it (``limit - spent - held``, never
    below 0): ``remaining_micros``, ``remaining_tokens``, ``remaining_requests``,
    ``remaining_concurrent``; ``None`` for a limit the budget does not set.
    """

    budget: str
    key: str
    spent_micros: int = 0
    held_micros: int = 0
    spent_tokens: int = 0
    held_tokens: int = 0
    spent_requests: int = 0
    live_holds: int = 0
    utilization: float = 0.0
    state: str = "ok"
    enforce: str = "deny"
    limit_micros: Optional[int] = None
    remaining_micros: Optional[int] = None
    limit_tokens: Optional[int] = None
    remaining_tokens: Optional[int] = None
    limit_requests: Optional[int] = None
    remaining_requests: Optional[int] = None
    limit_concurrent: Optional[int] = None
    remaining_concurrent: Optional[int] = None
    window: Optional[str] = None
    window_end: Optional[str] = None
    raw: Dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_wire(cls, obj: Mapping[str, Any]) -> "BudgetReport":
        return _build(cls, obj)

    @property
    def remaining_usd(self) -> Optional[Decimal]:
        return None if self.remaining_micros is None else micros_to_usd(self.remaining_micros)


def _budgets(obj: Mapping[str, Any]) -> List[BudgetReport]:
    return [BudgetReport.from_wire(b) for b in obj.get("budgets") or []]


@dataclass
class SubscriptionReport:
    """A flat-fee subscription (SPEC §10) as ``status`` reports it: its fee per period (never
    charged per call), the current fee period (RFC 3339) and its allowances' budget ids."""

    id: str
    fee_micros: int
    fee_period: str
    period_start: str
    period_end: str
    allowances: List[str]

    @classmethod
    def from_wire(cls, obj: Mapping[str, Any]) -> "SubscriptionReport":
        return _build(cls, obj)


@dataclass
class HelloAnswer:
    server: str
    protocol: int
    policy_version: int
    raw: Dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_wire(cls, obj: Mapping[str, Any]) -> "HelloAnswer":
        return _build(cls, obj)


@dataclass
class UsageAnswer:
    """Answer to ``record`` and ``commit``."""

    seq: int
    duplicate: bool
    cost_micros: int
    state: str
    budgets: List[BudgetReport]
    priced_at_max: bool = False
    late: bool = False
    reservation: Optional[str] = None
    overrun_micros: Optional[int] = None
    event_id: Optional[str] = None
    """The idempotency id this usage was sent with (generated by the client when not given)."""
    raw: Dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_wire(cls, obj: Mapping[str, Any], event_id: Optional[str] = None) -> "UsageAnswer":
        return _build(cls, obj, budgets=_budgets(obj), event_id=event_id)

    @property
    def cost_usd(self) -> Decimal:
        return micros_to_usd(self.cost_micros)


@dataclass
class Skipped:
    """A fallback candidate that was not chosen, and why."""

    model: str
    reason: str
    detail: str = ""

    @classmethod
    def from_wire(cls, obj: Mapping[str, Any]) -> "Skipped":
        return _build(cls, obj)


@dataclass
class Reason:
    """Why a decision was what it was."""

    code: str
    message: str
    budget: Optional[str] = None
    key: Optional[str] = None

    @classmethod
    def from_wire(cls, obj: Mapping[str, Any]) -> "Reason":
        return _build(cls, obj)


@dataclass
class DecisionAnswer:
    """Answer to ``reserve`` and ``check``. A denial is an answer (``decision == "deny"``)."""

    decision: str
    hold_micros: int
    budgets: List[BudgetReport]
    reason: Reason
    skipped: List[Skipped] = field(default_factory=list)
    model: Optional[str] = None
    max_output_tokens: Optional[int] = None
    expires_at: Optional[str] = None
    seq: Optional[int] = None
    duplicate: bool = False
    waited_ms: Optional[int] = None
    """How long the request waited in line (when it said ``wait_ms``)."""
    lag_ms: Optional[int] = None
    """Cluster mode, ``check``: how stale the node's fold it was decided on may be (ms)."""
    reservation_id: Optional[str] = None
    """The reservation id sent (``reserve`` only; generated by the client when not given)."""
    raw: Dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_wire(
        cls, obj: Mapping[str, Any], reservation_id: Optional[str] = None
    ) -> "DecisionAnswer":
        return _build(
            cls,
            obj,
            budgets=_budgets(obj),
            skipped=[Skipped.from_wire(s) for s in obj.get("skipped") or []],
            reason=Reason.from_wire(obj.get("reason") or {"code": "ok", "message": ""}),
            reservation_id=reservation_id,
        )

    @property
    def allowed(self) -> bool:
        """True for ``allow`` and ``warn``."""
        return self.decision != "deny"

    @property
    def hold_usd(self) -> Decimal:
        return micros_to_usd(self.hold_micros)


@dataclass
class ReleaseAnswer:
    seq: int
    duplicate: bool = False
    raw: Dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_wire(cls, obj: Mapping[str, Any]) -> "ReleaseAnswer":
        return _build(cls, obj)


@dataclass
class ExtendAnswer:
    seq: int
    expires_at: str
    raw: Dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_wire(cls, obj: Mapping[str, Any]) -> "ExtendAnswer":
        return _build(cls, obj)


@dataclass
class ObserveAnswer:
    """What ``observe`` recorded (SPEC §10): the quotas it was recorded for (one
    ``quota_observed`` event each; empty when no header said anything), the limits as read
    (``{"requests": {"limit":.., "remaining":.., "reset_at":..}, ...}``) and the rate-limit
    headers that were ignored, each ``{"header", "value", "reason"}``."""

    quotas: List[str]
    observed: Dict[str, Dict[str, Any]]
    ignored: List[Dict[str, str]]
    seq: Optional[int] = None
    raw: Dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_wire(cls, obj: Mapping[str, Any]) -> "ObserveAnswer":
        return _build(cls, obj)


@dataclass
class Tier:
    """A cost tier of the policy in force and its metadata (SPEC §10).

    ``origin`` is ``builtin``, ``changed`` (a built-in tier the policy changed), ``defined`` or
    ``implicit`` (only named, no metadata). ``price_range`` is
    ``{"min_input_per_mtok": .., "max_input_per_mtok": ..}`` in micro-USD per million input
    tokens, or ``None``.
    """

    id: str
    origin: str
    display_name: Optional[str] = None
    description: Optional[str] = None
    price_range: Optional[Dict[str, int]] = None
    color: Optional[str] = None
    icon: Optional[str] = None
    raw: Dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_wire(cls, obj: Mapping[str, Any]) -> "Tier":
        return _build(cls, obj)


@dataclass
class QuotaReport:
    """A ``[[quota]]`` of the policy in force (SPEC §10): ``limits`` are the observed limits that
    still bind, each ``{"limit": "requests", "of": 500, "observed_remaining": .., "remaining":
    .., "reset_at": ..}`` (``remaining`` less the usage and holds since the observation)."""

    id: str
    provider: str
    limits: List[Dict[str, Any]]
    observed_at: Optional[str] = None
    raw: Dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_wire(cls, obj: Mapping[str, Any]) -> "QuotaReport":
        return _build(cls, obj)


@dataclass
class StatusAnswer:
    """Buckets, most utilized first, at most the request's ``limit`` of them.

    ``total`` is how many buckets matched in all; ``truncated`` is true when ``budgets`` was cut
    at ``limit``. ``tiers`` are the cost tiers of the policy in force.
    """

    budgets: List[BudgetReport]
    total: int = 0
    truncated: bool = False
    subscriptions: List[SubscriptionReport] = field(default_factory=list)
    quotas: List[QuotaReport] = field(default_factory=list)
    tiers: List[Tier] = field(default_factory=list)
    lag_ms: Optional[int] = None
    """Cluster mode: how stale the node's folds may be (ms; the largest over partitions)."""
    raw: Dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_wire(cls, obj: Mapping[str, Any]) -> "StatusAnswer":
        return _build(
            cls,
            obj,
            budgets=_budgets(obj),
            subscriptions=[
                SubscriptionReport.from_wire(s) for s in obj.get("subscriptions") or []
            ],
            quotas=[QuotaReport.from_wire(q) for q in obj.get("quotas") or []],
            tiers=[Tier.from_wire(t) for t in obj.get("tiers") or []],
        )

    def bucket(self, budget: str, key: str = "") -> Optional[BudgetReport]:
        """The bucket of ``budget`` with scope key ``key``, if reported."""
        for b in self.budgets:
            if b.budget == budget and b.key == key:
                return b
        return None


@dataclass
class PartitionVerified:
    """One partition's copy, checked by a cluster node's ``verify``."""

    partition: int
    events: int
    head: str

    @classmethod
    def from_wire(cls, obj: Mapping[str, Any]) -> "PartitionVerified":
        return _build(cls, obj)


@dataclass
class VerifyAnswer:
    events: int
    head: str
    partitions: List[PartitionVerified] = field(default_factory=list)
    """Cluster mode: each partition's copy (``head`` is then BLAKE3 over their heads)."""
    raw: Dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_wire(cls, obj: Mapping[str, Any]) -> "VerifyAnswer":
        return _build(
            cls,
            obj,
            partitions=[PartitionVerified.from_wire(p) for p in obj.get("partitions") or []],
        )


@dataclass
class ReloadAnswer:
    policy_version: int
    raw: Dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_wire(cls, obj: Mapping[str, Any]) -> "ReloadAnswer":
        return _build(cls, obj)


@dataclass
class DiffRow:
    budget: str
    key: str
    before_micros: int
    after_micros: int
    delta_micros: int
    state_before: str
    state_after: str

    @classmethod
    def from_wire(cls, obj: Mapping[str, Any]) -> "DiffRow":
        return _build(cls, obj)


@dataclass
class ReplayAnswer:
    events: int
    diff: List[DiffRow]
    total_delta_micros: int
    applied: bool = False
    seq: Optional[int] = None
    raw: Dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_wire(cls, obj: Mapping[str, Any]) -> "ReplayAnswer":
        return _build(cls, obj, diff=[DiffRow.from_wire(d) for d in obj.get("diff") or []])


@dataclass
class ReportRow:
    """One period of one group of a report."""

    period_start: str
    group: Dict[str, Optional[str]]
    cost_micros: int
    input_tokens: int
    cached_input_tokens: int
    output_tokens: int
    requests: int
    denied: int

    @classmethod
    def from_wire(cls, obj: Mapping[str, Any]) -> "ReportRow":
        return _build(cls, obj)


@dataclass
class ReportAnswer:
    """Spend per period and group (``Client.report``)."""

    every: str
    timezone: str
    rows: List[ReportRow]
    total_rows: int
    truncated: bool = False
    subscriptions: List[Dict[str, Any]] = field(default_factory=list)
    """Each subscription's flat fee over the range: ``{"id", "fee_micros", "fee_period",
    "periods", "fee_total_micros"}`` (not in the rows' ``cost_micros``)."""
    raw: Dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_wire(cls, obj: Mapping[str, Any]) -> "ReportAnswer":
        return _build(cls, obj, rows=[ReportRow.from_wire(r) for r in obj.get("rows") or []])


@dataclass
class WhatIfDenial:
    """A reservation of the log that the what-if policy would have denied."""

    seq: int
    ts: str
    reservation_id: str
    labels: Dict[str, str]
    model: str
    hold_micros: int
    reason: str
    budget: Optional[str] = None
    key: Optional[str] = None
    partition: Optional[int] = None
    """Cluster mode: the partition whose log holds it (``seq`` is that log's)."""

    @classmethod
    def from_wire(cls, obj: Mapping[str, Any]) -> "WhatIfDenial":
        return _build(cls, obj)


@dataclass
class WhatIfExhausted:
    """A bucket the what-if policy would have exhausted, and when."""

    budget: str
    key: str
    at: str
    window_start: str

    @classmethod
    def from_wire(cls, obj: Mapping[str, Any]) -> "WhatIfExhausted":
        return _build(cls, obj)


@dataclass
class WhatIfPeak:
    """A budget's highest utilization under the what-if policy."""

    budget: str
    key: str
    utilization: float
    at: str

    @classmethod
    def from_wire(cls, obj: Mapping[str, Any]) -> "WhatIfPeak":
        return _build(cls, obj)


@dataclass
class WhatIfAnswer:
    """What another policy would have done with the log's requests (``Client.what_if``)."""

    events: int
    reservations: int
    denied: List[WhatIfDenial]
    denied_total: int
    denied_hold_micros: int
    usage_left_out: int
    usage_left_out_micros: int
    exhausted: List[WhatIfExhausted]
    exhausted_total: int
    peaks: List[WhatIfPeak]
    raw: Dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_wire(cls, obj: Mapping[str, Any]) -> "WhatIfAnswer":
        return _build(
            cls,
            obj,
            denied=[WhatIfDenial.from_wire(d) for d in obj.get("denied") or []],
            exhausted=[WhatIfExhausted.from_wire(d) for d in obj.get("exhausted") or []],
            peaks=[WhatIfPeak.from_wire(d) for d in obj.get("peaks") or []],
        )


@dataclass
class Event:
    """One logged event as ``export`` and ``tail`` stream it.

    ``type`` is e.g. ``usage_recorded``; ``data`` is the body's content for that type (the
    wire's ``body`` is ``{type: data}``).
    """

    seq: int
    ts: int
    time: str
    type: str
    body: Dict[str, Any]
    actor: Dict[str, Any] = field(default_factory=dict)
    cost_micros: Optional[int] = None
    price_version: Optional[int] = None
    prev_hash: Optional[str] = None
    hash: Optional[str] = None
    partition: Optional[int] = None
    """Cluster mode: the partition whose log holds it (``seq`` counts that log's events)."""
    version: Optional[int] = None
    """The envelope's version (``None`` from daemons that did not show it)."""
    raw: Dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_wire(cls, obj: Mapping[str, Any]) -> "Event":
        return _build(cls, obj)

    @property
    def data(self) -> Dict[str, Any]:
        inner = self.body.get(self.type) if isinstance(self.body, dict) else None
        return inner if isinstance(inner, dict) else {}
