"""LiteLLM calls whose mocked responses carry a provider's rate-limit headers (no network).

Run by test_litellm.py inside the LiteLLM virtual environment:

    python litellm_quota_scenario.py SOCKET TEAM

Each response carries OpenAI's ``x-ratelimit-*`` headers where LiteLLM keeps a provider's
headers (``_hidden_params["additional_headers"]``, as ``llm_provider-<name>``). BursarCallback
sends them with the commit; the test reads the ``quota_observed`` events back. Prints one JSON
object per call on stdout.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import uuid

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import litellm  # noqa: E402

from bursar_client import Client  # noqa: E402
from bursar_client.litellm import BursarCallback  # noqa: E402

SOCKET, TEAM = sys.argv[1], sys.argv[2]
MSGS = [{"role": "user", "content": "One word, please."}]

client = Client(SOCKET)
bursar = BursarCallback(client, labels={"org": "acme", "team": TEAM, "account": "prod"})
litellm.callbacks = [bursar]


def emit(**obj) -> None:
    print(json.dumps(obj), flush=True)


def with_headers(headers: dict) -> litellm.ModelResponse:
    r = litellm.ModelResponse(
        model="gpt-4o-mini",
        choices=[{"index": 0, "finish_reason": "stop",
                  "message": {"role": "assistant", "content": "Done."}}],
        usage=litellm.Usage(prompt_tokens=20, completion_tokens=5, total_tokens=25),
    )
    r._hidden_params["additional_headers"] = {f"llm_provider-{k}": v for k, v in headers.items()}
    return r


def settle(n: int) -> None:
    """LiteLLM runs success callbacks in the background: wait until `n` calls are recorded."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        b = client.status(labels={"team": TEAM}).bucket("team-daily", f"team={TEAM}")
        if b is not None and b.live_holds == 0 and b.spent_requests >= n:
            return
        time.sleep(0.05)


cid = str(uuid.uuid4())
litellm.completion(model="gpt-4o-mini", messages=MSGS, max_tokens=50, litellm_call_id=cid,
                   mock_response=with_headers({
                       "x-ratelimit-limit-requests": "500",
                       "x-ratelimit-remaining-requests": "7",
                       "x-ratelimit-reset-requests": "1h0m0s",
                       "x-ratelimit-limit-tokens": "200000",
                       "x-ratelimit-remaining-tokens": "199975",
                       "x-ratelimit-reset-tokens": "7ms",
                       "content-type": "application/json",
                   }))
settle(1)
emit(outcome="ok", kind="sync", call_id=cid)


async def last_request() -> str:
    cid = str(uuid.uuid4())
    await litellm.acompletion(model="gpt-4o-mini", messages=MSGS, max_tokens=50,
                              litellm_call_id=cid,
                              mock_response=with_headers({
                                  "x-ratelimit-remaining-requests": "0",
                                  "x-ratelimit-reset-requests": "1h",
                                  "x-ratelimit-reset-tokens": "in a while",
                              }))
    return cid


cid = asyncio.run(last_request())
settle(2)
emit(outcome="ok", kind="async", call_id=cid)
emit(outcome="done")
