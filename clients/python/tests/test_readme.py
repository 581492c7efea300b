"""The plain-agent example of the top-level README.md ("Python client and LiteLLM") runs as written.

It is run again and again against a real daemon (harness.POLICY: 0.05 USD a day per team), with
a stand-in for the model call, until it has gone through all three of its ways: gpt-4o, then
the gpt-4o-mini fallback once gpt-4o no longer fits, then the `BudgetDenied` branch.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import unittest
from unittest import mock

from harness import REPO_ROOT, Daemon

SECTION = "## Python client and LiteLLM"


def python_blocks() -> list:
    text = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    section = text[start:end if end != -1 else len(text)]
    return re.findall(r"^```python\n(.*?)^```$", section, re.S | re.M)


class ReadmeExampleTest(unittest.TestCase):
    def test_plain_agent_example_runs_through_fallback_and_denial(self) -> None:
        blocks = python_blocks()
        self.assertEqual(len(blocks), 2, "the section has the plain example and the LiteLLM one")
        code = compile(blocks[0], "README.md (Python client and LiteLLM)", "exec")
        called = []

        class Reply:
            output_tokens = 300

        def call_model(model: str) -> Reply:
            called.append(model)
            return Reply()

        d = Daemon().start()
        try:
            with mock.patch.dict(os.environ, {"BURSAR_SOCKET": d.socket}):
                printed = ""
                for _ in range(40):
                    out = io.StringIO()
                    scope = {"call_model": call_model}
                    with contextlib.redirect_stdout(out):
                        exec(code, scope)
                    scope["bursar"].close()
                    printed = out.getvalue()
                    if printed:
                        break
                from bursar_client import Client

                with Client(d.socket) as c:
                    spent = c.status(labels={"team": "search"}).bucket("team-daily", "team=search")
        finally:
            d.cleanup()
        self.assertEqual(printed.strip().split(":")[0], "over budget team-daily [team=search]")
        self.assertIn("gpt-4o", called)
        self.assertIn("gpt-4o-mini", called)
        first_mini = called.index("gpt-4o-mini")
        self.assertEqual(set(called[:first_mini]), {"gpt-4o"})
        self.assertEqual(set(called[first_mini:]), {"gpt-4o-mini"})
        # Every call that was made was committed, and nothing is left held.
        self.assertIsNotNone(spent)
        # 1200 in + 300 out: gpt-4o at 2.50 / 10.00 USD per Mtok, gpt-4o-mini at 0.15 / 0.60.
        cost = {"gpt-4o": 3000 + 3000, "gpt-4o-mini": 180 + 180}
        expected = sum(cost[m] for m in called)
        self.assertEqual(spent.spent_micros, expected)
        self.assertEqual(spent.held_micros, 0)


if __name__ == "__main__":
    unittest.main()
