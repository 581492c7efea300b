"""LiteLLM integration: reserve before each call, commit the actual usage, release on failure.

::

    import litellm
    from bursar_client.litellm import BursarCallback

    bursar = BursarCallback(labels={"org": "acme", "team": "search"})
    litellm.callbacks = [bursar]

    resp = await litellm.acompletion(model="gpt-4o-mini", messages=msgs,
                                     metadata={"bursar_labels": {"user": "u-17"}})
    # sync code: use bursar.completion(...) to be refused before the call (see below)
    resp = bursar.completion(model="gpt-4o-mini", messages=msgs)

How it maps onto LiteLLM's hooks:

* ``async_pre_call_deployment_hook`` (``acompletion``, and ``Router`` which calls it): reserves the
  worst case (prompt tokens counted with ``litellm.token_counter``, ``max_tokens`` /
  ``max_completion_tokens`` or the model's maximum output) and, when bursar says no, raises
  :class:`LiteLLMBudgetDenied` — a ``bursar_client.BudgetDenied`` that is also a
  ``litellm.BudgetExceededError`` — so the provider is never called.
* ``log_pre_api_call`` (the sync ``completion``): LiteLLM swallows exceptions raised there, so a
  sync call cannot be refused from a callback. The hook still reserves (so concurrent holds
  count), and a denial is logged as an error; to be refused, call :meth:`BursarCallback.completion`
  (reserves first, then calls ``litellm.completion``) or use ``acompletion``.
* success hooks: commit the response's usage. bursar's ``input_tokens`` are the *uncached*
  input tokens: ``prompt_tokens - cached_tokens - cache_write_tokens`` (LiteLLM's
  ``prompt_tokens`` include cache reads and writes); ``cached_tokens`` go to
  ``cached_input_tokens`` and cache writes to ``cache_write_tokens``. LiteLLM's own
  ``response_cost`` rides along as ``reported_cost_usd`` (audit only). A cache hit of LiteLLM's
  response cache spends nothing: the hold is released. The provider's rate-limit headers
  (OpenAI ``x-ratelimit-*``, Anthropic ``anthropic-ratelimit-*``, as LiteLLM keeps them in the
  response's ``_hidden_params["headers"]`` / ``["additional_headers"]``) go along with the
  commit, so each ``[[quota]]`` learns what the provider has left (SPEC §10).
* failure hooks: release the hold.

Labels: the ``labels`` given to the callback, then ``metadata["bursar_labels"]`` of the call
(a dict), then any top-level metadata keys named in ``label_keys``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Union

import litellm as _litellm
from litellm.integrations.custom_logger import CustomLogger

from . import _proto as P
from .client import Client
from .errors import BudgetDenied, BursarError, NotFound
from .types import DecisionAnswer, Usage

__all__ = ["BursarCallback", "LiteLLMBudgetDenied", "usage_from_response", "default_model_name",
           "response_rate_limit_headers"]

log = logging.getLogger("bursar_client.litellm")


def response_rate_limit_headers(response_obj: Any) -> Optional[Dict[str, str]]:
    """The provider's rate-limit headers of a LiteLLM response, or ``None``.

    LiteLLM keeps a response's raw headers in ``_hidden_params["headers"]`` and forwards them
    as ``llm_provider-<name>`` in ``_hidden_params["additional_headers"]``; both are read (the
    raw ones win), and only the rate-limit families bursar understands are kept."""
    hidden = getattr(response_obj, "_hidden_params", None)
    if not isinstance(hidden, Mapping):
        return None
    merged: Dict[str, Any] = {}
    for key in ("additional_headers", "headers"):
        source = hidden.get(key)
        if isinstance(source, Mapping):
            merged.update(P.rate_limit_headers(source) or {})
    return merged or None

# Providers whose models bursar's price table (from LiteLLM's data) lists without a prefix.
_UNPREFIXED_PROVIDERS = ("openai", "anthropic", "text-completion-openai")


class LiteLLMBudgetDenied(BudgetDenied, _litellm.BudgetExceededError):  # type: ignore[misc]
    """bursar refused a LiteLLM call. Catch it as ``bursar_client.BudgetDenied`` (budget, key,
    remaining_micros, reason) or as ``litellm.BudgetExceededError``."""

    def __init__(self, decision: DecisionAnswer) -> None:
        BudgetDenied.__init__(self, decision)
        report = self.report
        # litellm.BudgetExceededError's attributes, in USD.
        self.current_cost = (report.spent_micros + report.held_micros) / 1e6 if report else 0.0
        self.max_budget = (report.limit_micros or 0) / 1e6 if report else 0.0
        self.status_code = getattr(_litellm, "budget_exceeded_status_code", 400)
        self.llm_provider = ""
        self.entity_type = "bursar_budget"
        self.entity_id = self.budget


def default_model_name(model: str) -> str:
    """LiteLLM model string to bursar's name: ``openai/gpt-4o`` -> ``gpt-4o``; others unchanged
    (bursar's table keeps prefixes such as ``gemini/`` and ``mistral/``, like LiteLLM's)."""
    provider, sep, rest = model.partition("/")
    if sep and provider in _UNPREFIXED_PROVIDERS:
        return rest
    return model


def _get(obj: Any, name: str) -> Any:
    if obj is None:
        return None
    if isinstance(obj, Mapping):
        return obj.get(name)
    return getattr(obj, name, None)


def _int(v: Any) -> int:
    try:
        return max(int(v or 0), 0)
    except (TypeError, ValueError):
        return 0


def usage_from_response(response: Any) -> Optional[Usage]:
    """bursar :class:`~bursar_client.Usage` of a LiteLLM response (``None`` if it has none).

    Handles chat/text completions and embeddings (``prompt_tokens``/``completion_tokens``) and
    the Responses API (``input_tokens``/``output_tokens``). Cached reads and cache writes are
    taken out of the prompt count, since bursar prices them separately.
    """
    u = _get(response, "usage")
    if u is None:
        return None
    prompt = _get(u, "prompt_tokens")
    completion = _get(u, "completion_tokens")
    details = _get(u, "prompt_tokens_details")
    if prompt is None and _get(u, "input_tokens") is not None:  # Responses API
        prompt = _get(u, "input_tokens")
        completion = _get(u, "output_tokens")
        details = _get(u, "input_tokens_details")
    cached = _int(_get(details, "cached_tokens"))
    if not cached:
        cached = _int(_get(u, "cache_read_input_tokens"))
    written = _int(_get(details, "cache_write_tokens") or _get(details, "cache_creation_tokens"))
    if not written:
        written = _int(_get(u, "cache_creation_input_tokens"))
    prompt_n = _int(prompt)
    uncached = max(prompt_n - cached - written, 0)
    return Usage(
        input_tokens=uncached,
        output_tokens=_int(completion),
        cached_input_tokens=cached,
        cache_write_tokens=written,
    )


@dataclass
class _Pending:
    reservation_id: str
    model: str
    labels: Dict[str, str]
    live: bool


def _metadata(kwargs: Mapping[str, Any]) -> Mapping[str, Any]:
    for src in (kwargs, kwargs.get("litellm_params") or {}):
        for key in ("metadata", "litellm_metadata"):
            md = src.get(key) if isinstance(src, Mapping) else None
            if isinstance(md, Mapping) and md:
                return md
    return {}


class BursarCallback(CustomLogger):
    """A LiteLLM callback that keeps every call inside bursar's budgets.

    Args:
        client: a :class:`bursar_client.Client` (default: ``Client(socket_path)``).
        socket_path: used when ``client`` is not given.
        labels: labels for every call (e.g. ``{"org": "acme", "agent": "planner"}``).
        label_keys: top-level LiteLLM ``metadata`` keys to use as labels too.
        model_map: LiteLLM model string -> bursar model name (a callable or a mapping; the
            default strips ``openai/`` and ``anthropic/`` prefixes).
        ttl_seconds: hold lifetime (default: the daemon's policy).
        fail_open: when bursard cannot be reached, let calls through (logging a warning)
            instead of refusing them. Default False: no budget answer, no call.
    """

    def __init__(
        self,
        client: Optional[Client] = None,
        *,
        socket_path: Optional[str] = None,
        labels: Optional[Mapping[str, str]] = None,
        label_keys: Iterable[str] = (),
        model_map: Union[None, Callable[[str], str], Mapping[str, str]] = None,
        ttl_seconds: Optional[int] = None,
        fail_open: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.client = client if client is not None else Client(socket_path)
        self.labels = dict(labels or {})
        self.label_keys = tuple(label_keys)
        self.model_map = model_map
        self.ttl_seconds = ttl_seconds
        self.fail_open = fail_open
        self._pending: Dict[str, _Pending] = {}
        self._lock = threading.Lock()

    # --- helpers --------------------------------------------------------------------------

    def _model(self, model: str) -> str:
        if callable(self.model_map):
            return self.model_map(model)
        if isinstance(self.model_map, Mapping) and model in self.model_map:
            return self.model_map[model]
        return default_model_name(model)

    def _labels_for(self, kwargs: Mapping[str, Any]) -> Dict[str, str]:
        labels = dict(self.labels)
        md = _metadata(kwargs)
        extra = md.get("bursar_labels")
        if isinstance(extra, Mapping):
            labels.update({str(k): str(v) for k, v in extra.items()})
        for k in self.label_keys:
            if k in md and md[k] is not None:
                labels[k] = str(md[k])
        return labels

    @staticmethod
    def _max_output(kwargs: Mapping[str, Any]) -> Optional[int]:
        for src in (kwargs, kwargs.get("optional_params") or {}):
            for key in ("max_completion_tokens", "max_tokens", "max_output_tokens"):
                v = src.get(key) if isinstance(src, Mapping) else None
                if v is not None:
                    return int(v)
        return None

    @staticmethod
    def _input_tokens(model: str, kwargs: Mapping[str, Any]) -> int:
        messages = kwargs.get("messages")
        text = kwargs.get("input") if messages is None else None
        try:
            if messages is not None:
                return int(_litellm.token_counter(model=model, messages=messages))
            if isinstance(text, str):
                return int(_litellm.token_counter(model=model, text=text))
        except Exception:  # an estimate only: fall back to characters / 3
            log.debug("token_counter failed for %s", model, exc_info=True)
        blob = str(messages if messages is not None else text or "")
        return len(blob) // 3 + 1

    @staticmethod
    def _call_id(kwargs: Mapping[str, Any]) -> Optional[str]:
        cid = kwargs.get("litellm_call_id")
        if cid is None:
            cid = (kwargs.get("litellm_params") or {}).get("litellm_call_id")
        return None if cid is None else str(cid)

    def _reserve_call(self, model: str, kwargs: Mapping[str, Any]) -> P.Call:
        bmodel = self._model(model)
        return P.reserve(
            self._labels_for(kwargs), bmodel, self._input_tokens(model, kwargs),
            self._max_output(kwargs), self.ttl_seconds, None, None, "litellm-" + P.new_id(),
        )

    def _reserved(self, call_id: str, call: P.Call, decision: Optional[DecisionAnswer]) -> None:
        """Remember the reservation of ``call_id`` (``decision`` None: bursard unreachable)."""
        body = call.body
        live = decision is not None and decision.allowed
        with self._lock:
            self._pending[call_id] = _Pending(
                reservation_id=body["reservation_id"],
                model=(decision.model if decision is not None and decision.model else body["model"]),
                labels=dict(body["labels"]),
                live=live,
            )

    def _has(self, call_id: Optional[str]) -> bool:
        with self._lock:
            return call_id is not None and call_id in self._pending

    def _pop(self, call_id: Optional[str]) -> Optional[_Pending]:
        with self._lock:
            return None if call_id is None else self._pending.pop(call_id, None)

    def _reserve_sync(self, call_id: str, model: str, kwargs: Mapping[str, Any], raise_denied: bool) -> None:
        call = self._reserve_call(model, kwargs)
        try:
            decision: Optional[DecisionAnswer] = self.client._call(call)
        except BursarError as e:
            if not self.fail_open:
                if raise_denied:
                    raise
                log.error("bursar: cannot reserve for %s (%s); LiteLLM's sync hook cannot refuse the call", model, e)
            else:
                log.warning("bursar: cannot reserve for %s (%s); letting the call through", model, e)
            decision = None
        self._reserved(call_id, call, decision)
        if decision is not None and not decision.allowed:
            if raise_denied:
                self._pop(call_id)
                raise LiteLLMBudgetDenied(decision)
            log.error("bursar denied a sync litellm.completion that LiteLLM cannot stop from a "
                      "callback (use BursarCallback.completion or acompletion): %s",
                      LiteLLMBudgetDenied(decision))

    def _settle(self, kwargs: Mapping[str, Any], response_obj: Any) -> None:
        """Commit the usage of a finished call (or record it when there was no live hold)."""
        call_id = self._call_id(kwargs)
        p = self._pop(call_id)
        usage = usage_from_response(response_obj)
        cache_hit = bool(kwargs.get("cache_hit"))
        if usage is None or cache_hit:
            if p is not None and p.live:
                self._release(p)
            return
        cost = kwargs.get("response_cost")
        event_id = f"litellm-{call_id}-usage" if call_id else None
        headers = response_rate_limit_headers(response_obj)
        if p is not None and p.live:
            self.client.commit(p.reservation_id, usage, event_id=event_id, labels=p.labels,
                               model=p.model, reported_cost_usd=cost, headers=headers)
        else:
            model = p.model if p is not None else self._model(str(kwargs.get("model") or ""))
            labels = p.labels if p is not None else self._labels_for(kwargs)
            self.client.record(labels, model, usage, event_id=event_id, reported_cost_usd=cost,
                               headers=headers)

    def _release(self, p: Optional[_Pending]) -> None:
        if p is None or not p.live:
            return
        try:
            self.client.release(p.reservation_id)
        except NotFound:
            pass

    @staticmethod
    async def _off_loop(fn: Any, *args: Any) -> Any:
        """Run the blocking client call `fn` on the loop's thread pool; when no thread can be
        started any more, inline. LiteLLM flushes the async callbacks of a script that ended
        first (`asyncio.run(litellm.acompletion(...))` as its last line) from an atexit handler
        in a fresh loop, after the interpreter has begun shutting down, when a thread pool
        refuses work ("cannot schedule new futures after interpreter shutdown"); the usage
        must still be committed, and at exit blocking the loop for one round trip costs
        nothing."""
        loop = asyncio.get_running_loop()
        try:
            future = loop.run_in_executor(None, fn, *args)
        except RuntimeError:
            return fn(*args)
        return await future

    # --- LiteLLM hooks --------------------------------------------------------------------

    async def async_pre_call_deployment_hook(self, kwargs: Dict[str, Any], call_type: Any) -> Optional[dict]:
        call_id = self._call_id(kwargs)
        model = kwargs.get("model")
        if call_id is None or not isinstance(model, str) or self._has(call_id):
            return None
        await self._off_loop(functools.partial(self._reserve_sync, call_id, model, kwargs, True))
        return None

    def log_pre_api_call(self, model: Any, messages: Any, kwargs: Dict[str, Any]) -> None:
        call_id = self._call_id(kwargs)
        if call_id is None or self._has(call_id):
            return
        name = str(kwargs.get("model") or model or "")
        self._reserve_sync(call_id, name, {**kwargs, "messages": messages}, False)

    def log_success_event(self, kwargs: Dict[str, Any], response_obj: Any, start_time: Any, end_time: Any) -> None:
        try:
            self._settle(kwargs, response_obj)
        except Exception:
            log.exception("bursar: could not commit the usage of a LiteLLM call")

    async def async_log_success_event(self, kwargs: Dict[str, Any], response_obj: Any, start_time: Any, end_time: Any) -> None:
        try:
            await self._off_loop(self._settle, kwargs, response_obj)
        except Exception:
            log.exception("bursar: could not commit the usage of a LiteLLM call")

    def log_failure_event(self, kwargs: Dict[str, Any], response_obj: Any, start_time: Any, end_time: Any) -> None:
        try:
            self._release(self._pop(self._call_id(kwargs)))
        except Exception:
            log.exception("bursar: could not release the hold of a failed LiteLLM call")

    async def async_log_failure_event(self, kwargs: Dict[str, Any], response_obj: Any, start_time: Any, end_time: Any) -> None:
        try:
            await self._off_loop(self._release, self._pop(self._call_id(kwargs)))
        except Exception:
            log.exception("bursar: could not release the hold of a failed LiteLLM call")

    # --- sync calls that can be refused ---------------------------------------------------

    def completion(self, *args: Any, **kwargs: Any) -> Any:
        """``litellm.completion`` that bursar can refuse: reserves first (raising
        :class:`LiteLLMBudgetDenied` without calling the provider), then calls LiteLLM; this
        callback's hooks commit or release the hold. Register the callback in
        ``litellm.callbacks`` (or pass ``callbacks=[this]``)."""
        if self not in _litellm.callbacks and self not in (kwargs.get("callbacks") or []):
            raise RuntimeError("register the callback first: litellm.callbacks.append(bursar); "
                               "otherwise nothing would commit or release the hold")
        model = args[0] if args else kwargs.get("model")
        if not isinstance(model, str):
            raise TypeError("completion() needs a model")
        if len(args) > 1 and "messages" not in kwargs:
            kwargs["messages"] = args[1]
            args = args[:1]
        call_id = str(kwargs.setdefault("litellm_call_id", P.new_id()))
        self._reserve_sync(call_id, model, kwargs, True)
        try:
            return _litellm.completion(*args, **kwargs)
        except BaseException:
            # LiteLLM's failure hook releases too; whichever comes first wins.
            self._release(self._pop(call_id))
            raise
