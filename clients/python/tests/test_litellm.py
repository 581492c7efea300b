"""BursarCallback with the real litellm package from PyPI and its mock_response (no network).

litellm is installed once into a virtual environment under target/ (BURSAR_LITELLM_VENV to
override) and kept there as a cache. When it cannot be installed, the test is skipped and says
why; everything else about it is a failure.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import unittest
from pathlib import Path

from harness import HERE, REPO_ROOT, Daemon, team

from bursar_client import Client

VENV = Path(os.environ.get("BURSAR_LITELLM_VENV", REPO_ROOT / "target" / "py" / "litellm-venv"))
MARKER = VENV / ".litellm-installed"
# litellm reads the price of each model from its own table; keep it from fetching a newer one.
LITELLM_ENV = {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR"}


def venv_python() -> Path:
    return VENV / "bin" / "python"


def ensure_litellm() -> str:
    """Install litellm into VENV unless done before; returns why not when it cannot."""
    if MARKER.exists() and venv_python().exists():
        return ""
    VENV.parent.mkdir(parents=True, exist_ok=True)
    steps = [
        [sys.executable, "-m", "venv", "--clear", str(VENV)],
        [str(venv_python()), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
         "litellm"],
        [str(venv_python()), "-c", "import litellm, litellm.integrations.custom_logger"],
    ]
    for cmd in steps:
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=420,
                               env={**os.environ, **LITELLM_ENV})
        except (OSError, subprocess.TimeoutExpired) as e:
            return f"`{' '.join(cmd[:4])}` failed: {e}"
        if p.returncode != 0:
            tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
            return f"`{' '.join(cmd[:5])}` exited {p.returncode}: {' | '.join(tail)}"
    MARKER.write_text("ok\n")
    return ""


class LiteLLMTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls) -> None:
        why = ensure_litellm()
        if why:
            raise unittest.SkipTest(
                f"LiteLLM integration NOT tested: litellm could not be installed into {VENV} ({why})")
        cls.daemon = Daemon().start()
        cls.client = Client(cls.daemon.socket)
        cls.team = team()
        p = subprocess.run(
            [str(venv_python()), str(HERE / "litellm_scenario.py"), cls.daemon.socket, cls.team],
            capture_output=True, text=True, timeout=240, cwd=str(HERE),
            env={**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, **LITELLM_ENV},
        )
        cls.scenario_stderr = p.stderr[-3000:]
        if p.returncode != 0:
            cls.client.close()
            cls.daemon.cleanup()
            raise AssertionError(f"litellm scenario exited {p.returncode}:\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
        cls.calls = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]
        cls.events = list(cls.client.export(labels={"team": cls.team}))

    @classmethod
    def tearDownClass(cls) -> None:
        cls.client.close()
        cls.daemon.cleanup()

    def calls_of(self, *outcomes: str) -> list:
        return [c for c in self.calls if c["outcome"] in outcomes]

    def usage_event(self, call_id: str):
        found = [e for e in self.events if e.type == "usage_recorded"
                 and e.data["event_id"] == f"litellm-{call_id}-usage"]
        self.assertEqual(len(found), 1, f"usage events of call {call_id}: {found}\n{self.scenario_stderr}")
        return found[0]

    def test_scenario_ran_to_the_end(self) -> None:
        self.assertEqual(self.calls[-1]["outcome"], "done", self.calls)
        self.assertEqual(len(self.calls_of("ok")), 6, self.calls)
        self.assertEqual(len(self.calls_of("stream")), 1, self.calls)

    def test_recorded_tokens_equal_the_responses_usage(self) -> None:
        total_prompt = total_completion = 0
        for c in self.calls_of("ok", "stream"):
            u = self.usage_event(c["call_id"]).data["usage"]
            self.assertIsNotNone(c["prompt_tokens"], c)
            # bursar's input_tokens are the uncached ones; the cached ones are counted apart.
            self.assertEqual(u["input_tokens"] + u["cached_input_tokens"] + u["cache_write_tokens"],
                             c["prompt_tokens"], c)
            self.assertEqual(u["cached_input_tokens"], c.get("cached_tokens", 0), c)
            self.assertEqual(u["output_tokens"], c["completion_tokens"], c)
            total_prompt += c["prompt_tokens"]
            total_completion += c["completion_tokens"]
        cached = [c for c in self.calls_of("ok") if c["cached_tokens"]]
        self.assertEqual(len(cached), 2)
        usage = [e for e in self.events if e.type == "usage_recorded"]
        self.assertEqual(len(usage), 7)
        self.assertEqual(sum(e.data["usage"]["input_tokens"] + e.data["usage"]["cached_input_tokens"]
                             for e in usage), total_prompt)
        self.assertEqual(sum(e.data["usage"]["output_tokens"] for e in usage), total_completion)
        b = self.client.status(labels={"team": self.team}).bucket("team-daily", f"team={self.team}")
        self.assertEqual(b.spent_tokens, total_prompt + total_completion)
        self.assertEqual(b.spent_requests, 7)

    def test_cost_agrees_with_litellm_response_cost(self) -> None:
        rows = []
        for c in self.calls_of("ok"):
            e = self.usage_event(c["call_id"])
            litellm_micros = c["response_cost"] * 1_000_000
            rows.append((c["kind"], c["model"], e.cost_micros, round(litellm_micros, 3)))
            self.assertLessEqual(abs(e.cost_micros - litellm_micros), 1.0, rows[-1])
            # bursar rounds up once per event: never below LiteLLM's figure
            self.assertGreaterEqual(e.cost_micros + 1e-6, litellm_micros, rows[-1])
            # LiteLLM's own figure rides along for audit, rounded up to whole micro-USD
            self.assertIsNotNone(e.data.get("reported_cost_usd"), e.data)
        sys.stderr.write("\n  bursar vs LiteLLM cost (µUSD): "
                         + "; ".join(f"{k} {m}: {b} vs {lm}" for k, m, b, lm in rows) + "\n")

    def test_models_and_labels(self) -> None:
        for c in self.calls_of("ok", "stream"):
            e = self.usage_event(c["call_id"])
            self.assertEqual(e.data["model"], c["model"])  # "openai/gpt-4o" is bursar's "gpt-4o"
            labels = e.data["labels"]
            self.assertEqual((labels["org"], labels["team"], labels["agent"], labels["user_id"]),
                             ("acme", self.team, "litellm-test", "u-17"))

    def test_denied_calls_never_reach_the_provider(self) -> None:
        denied = [c for c in self.calls if c.get("kind", "").endswith("-denied")]
        self.assertEqual([c["outcome"] for c in denied], ["denied", "denied"], denied)
        for c in denied:
            self.assertEqual((c["budget"], c["key"]), ("team-daily", f"team={self.team}"))
            self.assertTrue(c["is_litellm_error"])
            self.assertGreater(c["remaining_micros"], 0)
            self.assertIn("team-daily", c["message"])
            self.assertIn("max_usd", c["message"])
            self.assertFalse([e for e in self.events if e.type == "usage_recorded"
                              and e.data["event_id"] == f"litellm-{c['call_id']}-usage"])
        self.assertEqual(len([e for e in self.events if e.type == "reservation_denied"]), 2)

    def test_failed_call_releases_its_hold(self) -> None:
        [failed] = [c for c in self.calls if c.get("kind") == "async-failed"]
        self.assertEqual(failed["outcome"], "failed")
        created = {e.data["reservation_id"] for e in self.events if e.type == "reservation_created"}
        committed = {e.data["reservation_id"] for e in self.events if e.type == "usage_recorded"}
        released = {e.data["reservation_id"] for e in self.client.export()
                    if e.type == "reservation_released"} & created
        self.assertEqual(len(created), 8)          # 7 completed calls + the failed one
        self.assertEqual(len(released), 1)
        self.assertEqual(created, committed | released)
        b = self.client.status(labels={"team": self.team}).bucket("team-daily", f"team={self.team}")
        self.assertEqual((b.live_holds, b.held_micros), (0, 0))


if __name__ == "__main__":
    unittest.main()
