"""Python client for bursard, the budget ledger daemon for LLM agents.

Standard library only. ``Client`` is blocking and thread-safe, ``AsyncClient`` is its asyncio
twin; ``bursar_client.litellm`` holds the LiteLLM callback (imported on demand).
"""

from .aio import AsyncClient, AsyncHold
from .client import Client, Hold
from .errors import (
    BadRequest,
    BudgetDenied,
    BursarError,
    Conflict,
    Disconnected,
    Forbidden,
    Internal,
    NotFound,
    Overloaded,
    ProtocolError,
    TooLarge,
    Unavailable,
    UnknownOp,
)
from ._proto import default_socket_path, new_id
from .types import (
    BudgetReport,
    DecisionAnswer,
    DiffRow,
    Event,
    ExtendAnswer,
    ObserveAnswer,
    HelloAnswer,
    Reason,
    ReleaseAnswer,
    ReloadAnswer,
    ReplayAnswer,
    ReportAnswer,
    ReportRow,
    Skipped,
    StatusAnswer,
    QuotaReport,
    SubscriptionReport,
    Tier,
    Usage,
    UsageAnswer,
    PartitionVerified,
    VerifyAnswer,
    WhatIfAnswer,
    WhatIfDenial,
    WhatIfExhausted,
    WhatIfPeak,
    micros_to_usd,
)

from ._version import __version__

__all__ = [
    "AsyncClient", "AsyncHold", "Client", "Hold",
    "BadRequest", "BudgetDenied", "BursarError", "Conflict", "Disconnected", "Forbidden",
    "Internal", "NotFound", "Overloaded", "ProtocolError", "TooLarge", "Unavailable", "UnknownOp",
    "BudgetReport", "DecisionAnswer", "DiffRow", "Event", "ExtendAnswer", "ObserveAnswer", "HelloAnswer", "Reason",
    "ReleaseAnswer", "ReloadAnswer", "ReplayAnswer", "ReportAnswer", "ReportRow", "Skipped", "StatusAnswer",
    "QuotaReport", "SubscriptionReport", "Tier", "Usage",
    "PartitionVerified", "UsageAnswer", "VerifyAnswer", "WhatIfAnswer", "WhatIfDenial", "WhatIfExhausted", "WhatIfPeak",
    "default_socket_path", "micros_to_usd", "new_id",
]
