"""Run every test of the Python client and print `N passed, M failed[, K skipped]` last."""

from __future__ import annotations

import sys
import time
import unittest
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _flatten(suite):
    for t in suite:
        if isinstance(t, unittest.TestSuite):
            yield from _flatten(t)
        else:
            yield t


def main() -> int:
    sys.path.insert(0, str(HERE))
    pattern = sys.argv[1] if len(sys.argv) > 1 else "test_*.py"
    suite = unittest.defaultTestLoader.discover(str(HERE), pattern=pattern, top_level_dir=str(HERE))
    tests = list(_flatten(suite))
    if any(t.id().startswith("test_litellm.") for t in tests):
        import litellm_env

        litellm_env.start()  # a cold install overlaps the other tests, which run first
        tests.sort(key=lambda t: t.id().startswith("test_litellm."))
    suite = unittest.TestSuite(tests)
    t0 = time.monotonic()
    result = unittest.TextTestRunner(verbosity=2, stream=sys.stdout).run(suite)
    elapsed = time.monotonic() - t0
    failed = len(result.failures) + len(result.errors) + len(result.unexpectedSuccesses)
    skipped = len(result.skipped)
    # testsRun counts test methods only; a setUpClass that fails or skips is reported as one
    # more failure or skip without being one of them.
    not_passed = [t for t, _ in result.failures + result.errors + result.skipped]
    not_passed += list(result.unexpectedSuccesses)
    passed = result.testsRun - sum(isinstance(t, unittest.TestCase) for t in not_passed)
    for test, reason in result.skipped:
        print(f"SKIPPED {test.id()}: {reason}")
    print(f"python client tests took {elapsed:.1f}s")
    line = f"{passed} passed, {failed} failed"
    if skipped:
        line += f", {skipped} skipped"
    print(line, flush=True)
    return 0 if failed == 0 and passed > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
