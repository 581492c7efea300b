"""BursarCallback with the real litellm package from PyPI and its mock_response (no network).

litellm is installed once into a virtual environment under target/ (see litellm_env.py) and
kept there as a cache. When it cannot be installed, the test is skipped and says why;
everything else about it is a failure.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import unittest
from pathlib import Path

import litellm_env
from harness import HERE, Daemon, team

from bursar_client import Client

LITELLM_ENV = litellm_env.ENV


def venv_python() -> Path:
    return litellm_env.venv_python()


class LiteLLMTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls) -> None:
        why = litellm_env.ensure()
        if why:
            raise unittest.SkipTest(
                f"LiteLLM integration NOT tested: {litellm_env.SPEC} could not be installed into "
                f"{litellm_env.VENV} ({why})")
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

    def test_the_tested_litellm_is_in_the_extras_range(self) -> None:
        # `pip install bursar-client[litellm]` must be able to pick the version tested here.
        spec = litellm_env.extra_requirement()
        p = subprocess.run(
            [str(venv_python()), "-m", "pip", "install", "--dry-run", "--no-index", "--no-deps",
             "--disable-pip-version-check", spec],
            capture_output=True, text=True, timeout=120)
        self.assertEqual(p.returncode, 0,
                         f"{litellm_env.SPEC} (tested) is outside the extra's {spec}:\n{p.stderr}")
        self.assertIn("Requirement already satisfied", p.stdout)

    def calls_of(self, *outcomes: str) -> list:
        return [c for c in self.calls if c["outcome"] in outcomes]

    def usage_event(self, call_id: str):
        found = [e for e in self.events if e.type == "usage_recorded"
                 and e.data["event_id"] == f"litellm-{call_id}-usage"]
        self.assertEqual(len(found), 1, f"usage events of call {call_id}: {found}\n{self.scenario_stderr}")
        return found[0]

    def test_a_one_shot_async_script_records_its_spend(self) -> None:
        t = team()
        p = subprocess.run(
            [str(venv_python()), str(HERE / "litellm_oneshot.py"), self.daemon.socket, t],
            capture_output=True, text=True, timeout=120, cwd=str(HERE),
            env={**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, **LITELLM_ENV},
        )
        self.assertEqual(p.returncode, 0, p.stderr[-3000:])
        self.assertNotIn("cannot schedule new futures", p.stderr)
        b = self.client.status(labels={"team": t}).bucket("team-daily", f"team={t}")
        self.assertIsNotNone(b, f"nothing recorded for the one-shot script:\n{p.stderr[-3000:]}")
        self.assertGreater(b.spent_micros, 0, p.stderr[-3000:])
        self.assertEqual((b.held_micros, b.live_holds, b.spent_requests), (0, 0, 1))

    def test_scenario_ran_to_the_end(self) -> None:
        self.assertEqual(self.calls[-1]["outcome"], "done", self.calls)
        self.assertEqual(len(self.calls_of("ok")), 8, self.calls)
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
        self.assertEqual(len(usage), 9)
        self.assertEqual(sum(e.data["usage"]["input_tokens"] + e.data["usage"]["cached_input_tokens"]
                             for e in usage), total_prompt)
        self.assertEqual(sum(e.data["usage"]["output_tokens"] for e in usage), total_completion)
        b = self.client.status(labels={"team": self.team}).bucket("team-daily", f"team={self.team}")
        self.assertEqual(b.spent_tokens, total_prompt + total_completion)
        self.assertEqual(b.spent_requests, 9)

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
        # + the sync call LiteLLM would not let us refuse
        self.assertEqual(len([e for e in self.events if e.type == "reservation_denied"]), 3)

    def test_plain_sync_completion_denial_is_logged_and_usage_recorded(self) -> None:
        [logged] = [c for c in self.calls if c["outcome"] == "logged"]
        self.assertEqual(len(logged["messages"]), 1, logged)
        self.assertIn("cannot stop", logged["messages"][0])
        self.assertIn("team-daily", logged["messages"][0])
        e = self.usage_event(logged["call_id"])
        self.assertEqual(e.data["reservation"], "none")  # recorded: the money was spent
        self.assertEqual(e.data["model"], "gpt-4o")

    def test_failed_call_releases_its_hold(self) -> None:
        [failed] = [c for c in self.calls if c.get("kind") == "async-failed"]
        self.assertEqual(failed["outcome"], "failed")
        created = {e.data["reservation_id"] for e in self.events if e.type == "reservation_created"}
        committed = {e.data["reservation_id"] for e in self.events if e.type == "usage_recorded"}
        released = {e.data["reservation_id"] for e in self.client.export()
                    if e.type == "reservation_released"} & created
        self.assertEqual(len(created), 9)  # 8 completed calls with a hold + the failed one
        self.assertEqual(len(released), 1)
        self.assertEqual(created, (committed | released) - {None})
        b = self.client.status(labels={"team": self.team}).bucket("team-daily", f"team={self.team}")
        self.assertEqual((b.live_holds, b.held_micros), (0, 0))


if __name__ == "__main__":
    unittest.main()


class LiteLLMQuotaHeadersTest(unittest.TestCase):
    """The callback sends each response's rate-limit headers with its commit (SPEC §10)."""

    def test_each_commit_carries_the_responses_rate_limit_headers_and_the_quota_binds(self) -> None:
        why = litellm_env.ensure()
        if why:
            self.skipTest(f"LiteLLM integration NOT tested: {litellm_env.SPEC} could not be "
                          f"installed into {litellm_env.VENV} ({why})")
        daemon = Daemon().start()
        self.addCleanup(daemon.cleanup)
        client = Client(daemon.socket)
        self.addCleanup(client.close)
        t = team()
        p = subprocess.run(
            [str(venv_python()), str(HERE / "litellm_quota_scenario.py"), daemon.socket, t],
            capture_output=True, text=True, timeout=240, cwd=str(HERE),
            env={**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, **LITELLM_ENV},
        )
        self.assertEqual(p.returncode, 0, p.stderr[-4000:])
        calls = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]
        self.assertEqual(calls[-1]["outcome"], "done", calls)
        events = list(client.export(labels={"account": "prod"}))
        observed = [e for e in events if e.type == "quota_observed"]
        self.assertEqual(len(observed), 2, f"{events}\n{p.stderr[-3000:]}")
        first, second = observed[0].data, observed[1].data
        self.assertEqual(first["event_id"], f"litellm-{calls[0]['call_id']}-usage")
        self.assertEqual(first["quota"], "openai-prod")
        self.assertEqual((first["requests"]["limit"], first["requests"]["remaining"]), (500, 7))
        self.assertEqual(first["tokens"]["remaining"], 199975)
        self.assertEqual(first["ignored"], [])
        self.assertEqual(second["event_id"], f"litellm-{calls[1]['call_id']}-usage")
        self.assertEqual(second["requests"]["remaining"], 0)
        self.assertEqual([i["header"] for i in second["ignored"]], ["x-ratelimit-reset-tokens"])
        # The crossing carries no labels: it is in the whole export.
        self.assertIn("quota_exhausted", [e.type for e in client.export()])
        # No request left at the provider: the next call there is refused with reason quota.
        d = client.check({"org": "acme", "team": t, "account": "prod"}, "gpt-4o-mini",
                         input_tokens=10, max_output_tokens=10)
        self.assertEqual((d.decision, d.reason.code), ("deny", "quota"), d)
