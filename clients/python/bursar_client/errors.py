"""Exceptions raised by the bursar clients.

Every error answer of the daemon (``{"ok":false,"error":{"code","message","field"}}``) becomes a
:class:`BursarError` subclass chosen by its ``code``; the code, message and offending field are
kept as attributes. :class:`BudgetDenied` is raised by ``hold()`` when a reservation is refused
(a refusal is an answer, not a protocol error, so ``reserve()`` itself never raises it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, Optional, Type

if TYPE_CHECKING:  # pragma: no cover
    from .types import BudgetReport, DecisionAnswer, Reason

__all__ = [
    "BursarError",
    "BadRequest",
    "UnknownOp",
    "TooLarge",
    "Conflict",
    "NotFound",
    "Forbidden",
    "Overloaded",
    "Unavailable",
    "Disconnected",
    "Internal",
    "ProtocolError",
    "BudgetDenied",
    "error_from_answer",
]


class BursarError(Exception):
    """An error answer from bursard (or a client-side failure that stands for one).

    Attributes:
        code: the protocol's error code (``bad_request``, ``conflict``, ``not_found``, ...).
        message: the daemon's human-readable message.
        field: dotted path of the offending request field, when one is to blame.
        answer: the raw answer object, when there was one.
    """

    code: str = "internal"

    def __init__(
        self,
        message: str,
        code: Optional[str] = None,
        field: Optional[str] = None,
        answer: Optional[Dict[str, Any]] = None,
    ) -> None:
        # Not super(): subclasses may also derive from other libraries' exceptions (see
        # bursar_client.litellm) whose constructors take other arguments.
        Exception.__init__(self, message)
        if code is not None:
            self.code = code
        self.message = message
        self.field = field
        self.answer = answer

    def __str__(self) -> str:
        where = f" (field {self.field})" if self.field else ""
        return f"{self.code}: {self.message}{where}"


class BadRequest(BursarError):
    """The request was malformed or invalid; ``field`` names the culprit."""

    code = "bad_request"


class UnknownOp(BursarError):
    """The daemon does not know the op (an older daemon?)."""

    code = "unknown_op"


class TooLarge(BursarError):
    """The request line was longer than 64 KiB."""

    code = "too_large"


class Conflict(BursarError):
    """An idempotency id was reused for a different payload."""

    code = "conflict"


class NotFound(BursarError):
    """No such (live) reservation."""

    code = "not_found"


class Forbidden(BursarError):
    """The peer may not do this (admin-only op)."""

    code = "forbidden"


class Overloaded(BursarError):
    """The daemon's queue stayed full for longer than the client's retry budget."""

    code = "overloaded"


class Unavailable(BursarError):
    """The daemon cannot write its log and fails closed (or cannot be reached at all)."""

    code = "unavailable"


class Disconnected(Unavailable):
    """The daemon could not be reached (or kept dropping the connection) within the retry budget.

    The request may or may not have been applied; resending it with the same ids is safe.
    """


class Internal(BursarError):
    """A bug in the daemon."""

    code = "internal"


class ProtocolError(BursarError):
    """The daemon sent something that is not a valid answer."""

    code = "internal"


class BudgetDenied(BursarError):
    """A reservation was refused.

    Attributes:
        decision: the full :class:`~bursar_client.types.DecisionAnswer`.
        reason: its :class:`~bursar_client.types.Reason` (``code`` is ``budget``, ``quota``, ``tier_cap``,
            ``unknown_model``, ``missing_capability`` or ``max_keys``).
        budget: id of the budget to blame, when one is.
        key: that budget's scope key (e.g. ``team=search``).
        report: the :class:`~bursar_client.types.BudgetReport` of that bucket, when present.
        remaining_micros: what is left in that bucket, in micro-USD (``None`` when the denial
            is not about a spend limit of a known bucket).
        model: the model that was considered last.
        code: the reason code (``budget``, ``tier_cap``, ...).
    """

    def __init__(self, decision: "DecisionAnswer") -> None:
        reason = decision.reason
        self.decision = decision
        self.reason: "Reason" = reason
        self.budget: Optional[str] = reason.budget
        self.key: Optional[str] = reason.key
        self.model: Optional[str] = decision.model
        report = None
        if reason.budget is not None:
            for b in decision.budgets:
                if b.budget == reason.budget and (reason.key is None or b.key == reason.key):
                    report = b
                    break
        self.report: "Optional[BudgetReport]" = report
        self.remaining_micros: Optional[int] = report.remaining_micros if report else None
        parts = [f"bursar denied the call: {reason.message}"]
        if reason.budget is not None:
            scope = f" [{reason.key}]" if reason.key else ""
            parts.append(f"budget {reason.budget}{scope}")
        if self.remaining_micros is not None:
            parts.append(f"remaining {self.remaining_micros / 1_000_000:.6f} USD")
        parts.append(f"this call needs up to {decision.hold_micros / 1_000_000:.6f} USD")
        super().__init__("; ".join(parts), code=reason.code, answer=decision.raw)

    def __str__(self) -> str:
        return self.message


_BY_CODE: Dict[str, Type[BursarError]] = {
    cls.code: cls
    for cls in (BadRequest, UnknownOp, TooLarge, Conflict, NotFound, Forbidden, Overloaded,
                Unavailable, Internal)
}


def error_from_answer(answer: Dict[str, Any]) -> BursarError:
    """Turn an ``{"ok":false,...}`` answer into the matching exception."""
    err = answer.get("error")
    if not isinstance(err, dict):
        return ProtocolError(f"error answer without an error object: {answer!r}", answer=answer)
    code = str(err.get("code", "internal"))
    cls = _BY_CODE.get(code, BursarError)
    return cls(str(err.get("message", "")), code=code, field=err.get("field"), answer=answer)
