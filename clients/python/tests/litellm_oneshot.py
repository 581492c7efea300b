"""A one-shot async agent: `asyncio.run(litellm.acompletion(...))` is the script's last line.

LiteLLM runs its async success callbacks from a queue that, when the script ends first, is
flushed by an atexit handler in a fresh event loop, after the interpreter has begun shutting
down: the usage must still reach bursar (issue 13.16).
"""

from __future__ import annotations

import asyncio
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import litellm  # noqa: E402

from bursar_client import Client  # noqa: E402
from bursar_client.litellm import BursarCallback  # noqa: E402

SOCKET, TEAM = sys.argv[1], sys.argv[2]
litellm.callbacks = [BursarCallback(Client(SOCKET), labels={"org": "acme"})]

asyncio.run(litellm.acompletion(model="gpt-4o-mini", mock_response="done",
                                messages=[{"role": "user", "content": "hi"}],
                                metadata={"bursar_labels": {"team": TEAM}}))
