"""Drive LiteLLM with BursarCallback and mocked responses (no network); report what happened.

Run by test_litellm.py inside a virtual environment that has litellm:

    python litellm_scenario.py SOCKET TEAM

Prints one JSON object per call on stdout; the test compares them with bursar's log.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time
import uuid

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import litellm  # noqa: E402

from bursar_client import BudgetDenied, Client  # noqa: E402
from bursar_client.litellm import BursarCallback, LiteLLMBudgetDenied  # noqa: E402

SOCKET, TEAM = sys.argv[1], sys.argv[2]
MSGS = [{"role": "user", "content": "Summarise the budget ledger design in one sentence."}]
META = {"bursar_labels": {"team": TEAM}, "user_id": "u-17"}

client = Client(SOCKET)
bursar = BursarCallback(client, labels={"org": "acme", "agent": "litellm-test"},
                        label_keys=["user_id"])
litellm.callbacks = [bursar]


def emit(**obj) -> None:
    print(json.dumps(obj), flush=True)


def cached_response(model: str, prompt: int, cached: int, completion: int) -> litellm.ModelResponse:
    return litellm.ModelResponse(
        model=model,
        choices=[{"index": 0, "finish_reason": "stop",
                  "message": {"role": "assistant", "content": "A ledger of events."}}],
        usage=litellm.Usage(prompt_tokens=prompt, completion_tokens=completion,
                            total_tokens=prompt + completion,
                            prompt_tokens_details={"cached_tokens": cached}),
    )


def ok(kind: str, call_id: str, model: str, resp) -> None:
    u = resp.usage
    details = getattr(u, "prompt_tokens_details", None)
    emit(outcome="ok", kind=kind, call_id=call_id, model=model,
         prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens,
         cached_tokens=(getattr(details, "cached_tokens", 0) or 0) if details else 0,
         response_cost=resp._hidden_params.get("response_cost"))


def sync_calls() -> None:
    # Plain litellm.completion: the callback reserves in log_pre_api_call and commits.
    for n in range(2):
        cid = str(uuid.uuid4())
        r = litellm.completion(model="gpt-4o-mini", messages=MSGS, mock_response=f"answer {n}",
                               metadata=META, max_tokens=300, litellm_call_id=cid)
        ok("sync", cid, "gpt-4o-mini", r)
    # bursar.completion: reserves before LiteLLM runs, so it can refuse.
    cid = str(uuid.uuid4())
    r = bursar.completion(model="gpt-4o-mini", messages=MSGS, metadata=META, max_tokens=500,
                          mock_response=cached_response("gpt-4o-mini", 1200, 1000, 300),
                          litellm_call_id=cid)
    ok("sync-wrapper-cached", cid, "gpt-4o-mini", r)
    # A plain sync litellm.completion cannot be refused from a callback (LiteLLM swallows the
    # exception): the denial is logged, the call goes ahead, and its usage is still recorded.
    cid = str(uuid.uuid4())
    logged = []

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            logged.append(record.getMessage())

    catch = Catch(logging.ERROR)
    logging.getLogger("bursar_client.litellm").addHandler(catch)
    r = litellm.completion(model="gpt-4o", messages=MSGS, mock_response="went ahead",
                           metadata=META, litellm_call_id=cid)
    logging.getLogger("bursar_client.litellm").removeHandler(catch)
    ok("sync-unrefusable", cid, "gpt-4o", r)
    emit(outcome="logged", kind="sync-unrefusable", call_id=cid,
         messages=[m for m in logged if "denied" in m])
    cid = str(uuid.uuid4())
    try:
        bursar.completion(model="gpt-4o", messages=MSGS, metadata=META, mock_response="never",
                          litellm_call_id=cid)
        emit(outcome="not-denied", kind="sync-denied", call_id=cid)
    except BudgetDenied as e:
        emit(outcome="denied", kind="sync-denied", call_id=cid, budget=e.budget, key=e.key,
             remaining_micros=e.remaining_micros, message=str(e),
             is_litellm_error=isinstance(e, litellm.BudgetExceededError))


async def async_calls() -> None:
    for n in range(2):
        cid = str(uuid.uuid4())
        r = await litellm.acompletion(model="gpt-4o", messages=MSGS, mock_response=f"async {n}",
                                      metadata=META, max_tokens=200, litellm_call_id=cid)
        ok("async", cid, "gpt-4o", r)
    cid = str(uuid.uuid4())
    r = await litellm.acompletion(model="openai/gpt-4o", messages=MSGS, metadata=META,
                                  max_tokens=400, litellm_call_id=cid,
                                  mock_response=cached_response("gpt-4o", 2048, 1024, 150))
    ok("async-prefixed-cached", cid, "gpt-4o", r)
    # Through a Router (it calls litellm.acompletion per deployment).
    router = litellm.Router(model_list=[{"model_name": "smart", "litellm_params": {
        "model": "openai/gpt-4o-mini", "api_key": "unused-with-mock_response"}}])
    cid = str(uuid.uuid4())
    r = await router.acompletion(model="smart", messages=MSGS, mock_response="routed",
                                 metadata=META, max_tokens=100, litellm_call_id=cid)
    ok("router", cid, "gpt-4o-mini", r)
    cid = str(uuid.uuid4())
    stream = await litellm.acompletion(model="gpt-4o-mini", messages=MSGS, metadata=META,
                                       stream=True, stream_options={"include_usage": True},
                                       mock_response="a streamed answer in a few words",
                                       max_tokens=64, litellm_call_id=cid)
    chunks = [c async for c in stream]
    usage = next((c.usage for c in reversed(chunks) if getattr(c, "usage", None)), None)
    emit(outcome="stream", kind="async-stream", call_id=cid, model="gpt-4o-mini",
         prompt_tokens=usage.prompt_tokens if usage else None,
         completion_tokens=usage.completion_tokens if usage else None)
    # Denied before the provider is called: no max_tokens, so the hold is the model's whole
    # output (16384 × 10 USD/Mtok), more than the team's 0.05 USD.
    cid = str(uuid.uuid4())
    try:
        await litellm.acompletion(model="gpt-4o", messages=MSGS, metadata=META,
                                  mock_response="never", litellm_call_id=cid)
        emit(outcome="not-denied", kind="async-denied", call_id=cid)
    except LiteLLMBudgetDenied as e:
        emit(outcome="denied", kind="async-denied", call_id=cid, budget=e.budget, key=e.key,
             remaining_micros=e.remaining_micros, message=str(e),
             is_litellm_error=isinstance(e, litellm.BudgetExceededError))
    # The provider fails: the hold is released.
    cid = str(uuid.uuid4())
    try:
        await litellm.acompletion(model="gpt-4o-mini", messages=MSGS, metadata=META,
                                  max_tokens=100, mock_response=Exception("provider down"),
                                  litellm_call_id=cid)
        emit(outcome="not-failed", kind="async-failed", call_id=cid)
    except Exception as e:  # LiteLLM maps it to one of its exceptions
        emit(outcome="failed", kind="async-failed", call_id=cid, error=type(e).__name__)
    await settle()


async def settle() -> None:
    """LiteLLM runs success/failure callbacks in the background: wait until no hold is live."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        s = client.status(labels={"team": TEAM}, budget="team-daily")
        b = s.bucket("team-daily", f"team={TEAM}")
        if b is not None and b.live_holds == 0 and b.spent_requests >= 9:
            return
        await asyncio.sleep(0.1)


sync_calls()
asyncio.run(async_calls())
emit(outcome="done")
