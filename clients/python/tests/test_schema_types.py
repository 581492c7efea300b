"""bursar_client's requests and answer types against the protocol's JSON Schemas (schemas/json).

The schemas are generated from the daemon's Rust types (schemas/tests/json_schema_drift.rs
keeps them current), so a field the daemon adds or drops shows up here as a failure naming the
Python side to change: an answer dataclass in types.py, or a request builder in _proto.py.
"""

from __future__ import annotations

import dataclasses
import json
import typing
import unittest
from typing import Any, Dict, Set, Tuple

from harness import REPO_ROOT

from bursar_client import _proto as P
from bursar_client import errors, types

SCHEMAS = REPO_ROOT / "schemas" / "json"

# Answer keys that are not content: every answer has `ok`, and echoes the request's `req`.
ENVELOPE = {"ok", "req"}

# Answer types of types.py and where their schema is: (file, $defs entry or None).
ANSWERS: Dict[type, Tuple[str, Any]] = {
    types.HelloAnswer: ("answer-hello", None),
    types.UsageAnswer: ("answer-usage", None),
    types.DecisionAnswer: ("answer-decision", None),
    types.ReleaseAnswer: ("answer-release", None),
    types.ExtendAnswer: ("answer-extend", None),
    types.ObserveAnswer: ("answer-observe", None),
    types.StatusAnswer: ("answer-status", None),
    types.VerifyAnswer: ("answer-verify", None),
    types.PartitionVerified: ("answer-verify", "PartitionVerified"),
    types.ReloadAnswer: ("answer-reload", None),
    types.ReplayAnswer: ("answer-replay", None),
    types.WhatIfAnswer: ("answer-what-if", None),
    types.ReportAnswer: ("answer-report", None),
    types.ReportRow: ("answer-report", "ReportRow"),
    types.WhatIfDenial: ("answer-what-if", "WhatIfDenial"),
    types.WhatIfExhausted: ("answer-what-if", "WhatIfExhausted"),
    types.WhatIfPeak: ("answer-what-if", "WhatIfPeak"),
    types.BudgetReport: ("answer-status", "BudgetReport"),
    types.SubscriptionReport: ("answer-status", "SubscriptionReport"),
    types.QuotaReport: ("answer-status", "QuotaReport"),
    types.Tier: ("answer-status", "TierDef"),
    types.Reason: ("answer-decision", "Reason"),
    types.Skipped: ("answer-decision", "Skipped"),
    types.DiffRow: ("answer-replay", "DiffRow"),
    types.Event: ("answer-event-line", "ExportedEvent"),
    types.Usage: ("request-record", "Usage"),
}

# Answer schemas that have no dataclass, and why.
ANSWERS_ELSEWHERE = {
    "answer-error": "an exception of errors.py (test_error_answer_fields_reach_the_exception)",
    "answer-event-line": "`{event: ...}`; its event is types.Event",
    "answer-stream-end": "ends the `export`/`tail` iterators; its `count` is not exposed",
}

# Fields the client adds to what the daemon sent.
CLIENT_ONLY = {
    types.UsageAnswer: {"raw", "event_id"},
    types.DecisionAnswer: {"raw", "reservation_id"},
}

# Fields the schema requires that the dataclass still gives a default: decoding stays lenient
# for them (an answer of an older daemon without `total`, `remaining_*` or `window` decodes),
# and the dataclass can be built by hand with only the identifying fields. A new required field
# must either have no default or be listed here.
DEFAULTED = {
    types.BudgetReport: {"spent_micros", "held_micros", "spent_tokens", "held_tokens",
                         "spent_requests", "live_holds", "utilization", "state", "enforce",
                         "window"},
    types.StatusAnswer: {"total", "truncated"},
    types.ReplayAnswer: {"applied"},
    types.Skipped: {"detail"},
    types.Event: {"actor", "prev_hash", "hash"},
}

# One call of each request builder with every argument given, and one with only what is
# required: (schema file, full, minimal). The ops without a schema (verify, reload) send no
# fields.
REQUESTS = {
    "request-hello": (P.hello("me").body, P.hello(None).body),
    "request-record": (
        P.record({"a": "b"}, "m", types.Usage(), "e", "2026-01-01T00:00:00Z", "0.1",
                 {"x-ratelimit-remaining-requests": "1"}).body,
        P.record(None, "m", types.Usage(), None, None, None).body,
    ),
    "request-reserve": (
        P.reserve({"a": "b"}, "m", 1, 2, 3, ["m"], ["vision"], "r", 5).body,
        P.reserve(None, None, 0, None, None, None, None, None).body,
    ),
    "request-check": (
        P.check({"a": "b"}, "m", 1, 2, ["m"], ["vision"], 5).body,
        P.check(None, None, 0, None, None, None).body,
    ),
    "request-commit": (
        P.commit("r", types.Usage(), "e", {"a": "b"}, "m", "2026-01-01T00:00:00Z", "0.1",
                 {"x-ratelimit-remaining-requests": "1"}).body,
        P.commit("r", types.Usage(), None, None, None, None, None).body,
    ),
    "request-release": (P.release("r").body, P.release("r").body),
    "request-observe": (
        # Normalised limits and raw headers are two requests: together they send every field.
        {k: v
         for body in (P.observe("openai", {"a": "b"}, {"requests": {
                          "remaining": 1, "reset_at": "2026-01-01T00:00:00Z"}}, None).body,
                      P.observe("openai", None, None, {"x-ratelimit-remaining-requests": "1"}).body)
         for k, v in body.items() if v is not None},
        P.observe("openai", None, None, {}).body,
    ),
    "request-extend": (P.extend("r", 5).body, P.extend("r", 5).body),
    "request-status": (P.status({"a": "b"}, "b", 3).body, P.status(None, None, None).body),
    "request-replay": (
        # A repricing and a what-if together send every field of the schema.
        {k: v
         for body in (P.replay({"models": {}}, "2026-01-01T00:00:00Z", True).body,
                      P.replay({}, None, False, "[[budget]]").body)
         for k, v in body.items() if v is not None},
        P.replay({}, None, False).body,
    ),
    "request-report": (
        P.report(["team"], "day", "UTC", "2026-01-01T00:00:00Z", "2026-01-02T00:00:00Z",
                 {"a": "b"}).body,
        P.report(None, None, None, None, None, None).body,
    ),
    "request-export": (
        P.export("2026-01-01T00:00:00Z", "2026-01-02T00:00:00Z", {"a": "b"}, 1),
        P.export(None, None, None),
    ),
    "request-tail": (P.tail(1, True, ["budget_warned"], 0), P.tail(None, False)),
}


def load(name: str) -> Dict[str, Any]:
    with open(SCHEMAS / f"{name}.schema.json", encoding="utf-8") as f:
        return json.load(f)


def schema_of(name: str, definition: Any) -> Dict[str, Any]:
    schema = load(name)
    return schema["$defs"][definition] if definition else schema


def nullable(prop: Dict[str, Any]) -> bool:
    t = prop.get("type")
    return t == "null" or (isinstance(t, list) and "null" in t)


def sent(body: Dict[str, Any]) -> Set[str]:
    """The keys that go on the wire (None is left out, as Call.line does), less `op`."""
    return {k for k, v in body.items() if v is not None} - {"op"}


class AnswerTypesTest(unittest.TestCase):
    def test_every_answer_schema_has_a_python_side(self) -> None:
        mapped = {file for file, _ in ANSWERS.values()} | set(ANSWERS_ELSEWHERE)
        files = {p.name[: -len(".schema.json")] for p in SCHEMAS.glob("answer-*.schema.json")}
        self.assertEqual(files - mapped, set(), "answer schemas without a type in types.py")

    def test_fields_match_the_schema(self) -> None:
        for cls, (file, definition) in ANSWERS.items():
            with self.subTest(type=cls.__name__, schema=f"{file}.schema.json"):
                schema = schema_of(file, definition)
                props = set(schema["properties"]) - ENVELOPE
                fields = {f.name for f in dataclasses.fields(cls)}
                fields -= CLIENT_ONLY.get(cls, {"raw"})
                self.assertEqual(
                    sorted(props - fields), [],
                    f"in the schema, missing from types.{cls.__name__}")
                self.assertEqual(
                    sorted(fields - props), [],
                    f"in types.{cls.__name__}, not in the schema")

    def test_required_fields_match_the_schema(self) -> None:
        for cls, (file, definition) in ANSWERS.items():
            with self.subTest(type=cls.__name__, schema=f"{file}.schema.json"):
                schema = schema_of(file, definition)
                required = set(schema.get("required", [])) - ENVELOPE
                no_default = {
                    f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING
                    and f.default_factory is dataclasses.MISSING  # type: ignore[misc]
                }
                # A field the client cannot do without must be one the daemon always sends.
                self.assertEqual(
                    sorted(no_default - required), [],
                    f"types.{cls.__name__} requires fields the schema does not")
                self.assertEqual(
                    sorted(required - no_default), sorted(DEFAULTED.get(cls, set())),
                    f"fields the schema requires that types.{cls.__name__} gives a default "
                    f"(give them none, or list them in DEFAULTED)")

    def test_nullable_fields_are_optional(self) -> None:
        for cls, (file, definition) in ANSWERS.items():
            with self.subTest(type=cls.__name__, schema=f"{file}.schema.json"):
                props = schema_of(file, definition)["properties"]
                hints = typing.get_type_hints(cls)
                for name, prop in props.items():
                    if name in ENVELOPE or not nullable(prop):
                        continue
                    self.assertIn(
                        type(None), typing.get_args(hints[name]),
                        f"{cls.__name__}.{name} can be null on the wire: make it Optional")

    def test_error_answer_fields_reach_the_exception(self) -> None:
        wire = load("answer-error")["$defs"]["WireError"]
        error = {name: f"value of {name}" for name in wire["properties"]}
        error["code"] = "not_found"
        exc = errors.error_from_answer({"ok": False, "error": error})
        self.assertIsInstance(exc, errors.NotFound)
        for name, value in error.items():
            self.assertEqual(getattr(exc, name, None), value, f"BursarError.{name}")


class RequestsTest(unittest.TestCase):
    def test_every_request_schema_has_a_builder(self) -> None:
        files = {p.name[: -len(".schema.json")] for p in SCHEMAS.glob("request-*.schema.json")}
        self.assertEqual(files - set(REQUESTS), set(), "request schemas without a builder here")

    def test_builders_send_the_schema_fields(self) -> None:
        for file, (full, minimal) in REQUESTS.items():
            with self.subTest(schema=f"{file}.schema.json"):
                schema = load(file)
                props = set(schema.get("properties", {}))
                self.assertEqual(
                    sorted(props - sent(full)), [],
                    "in the schema, never sent by _proto.py (and the client method)")
                self.assertEqual(sorted(sent(full) - props), [], "sent, not in the schema")
                required = set(schema.get("required", []))
                self.assertEqual(
                    sorted(required - sent(minimal)), [],
                    "required by the schema, missing when the optional arguments are left out")

    def test_estimate_and_usage_match_the_schema(self) -> None:
        estimate = set(load("request-reserve")["$defs"]["Estimate"]["properties"])
        self.assertEqual(sent(P.reserve(None, "m", 1, 2, None, None, None, None).body["estimate"]),
                         estimate)
        self.assertEqual(sent(P.check(None, "m", 1, 2, None, None).body["estimate"]), estimate)
        usage = set(load("request-commit")["$defs"]["Usage"]["properties"])
        self.assertEqual(set(types.Usage().to_wire()), usage)


if __name__ == "__main__":
    unittest.main()
