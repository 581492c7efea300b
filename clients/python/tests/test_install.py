"""`pip install ./clients/python` gives a working, dependency-free package."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import unittest
from pathlib import Path

from harness import PY_ROOT, REPO_ROOT, Daemon

VENV = REPO_ROOT / "target" / "py" / "install-venv"

SMOKE = textwrap.dedent("""
    import asyncio, importlib.metadata as md, bursar_client
    from bursar_client import Client, AsyncClient, Usage, BudgetDenied
    assert bursar_client.__file__.startswith(PREFIX), bursar_client.__file__
    # standard library only: the one requirement is the optional `[litellm]` extra
    assert all("extra ==" in r for r in md.requires("bursar-client") or []), md.requires("bursar-client")
    c = Client()  # BURSAR_SOCKET
    with c.hold({"org": "acme", "team": "install"}, "gpt-4o-mini", input_tokens=1000,
                max_output_tokens=100) as h:
        h.commit(Usage(input_tokens=1000, output_tokens=100))
    try:
        with c.hold({"org": "acme", "team": "install"}, "gpt-4o", input_tokens=1,
                    max_output_tokens=16000):
            raise SystemExit("not denied")
    except BudgetDenied as e:
        pass
    async def main():
        async with AsyncClient() as a:
            return (await a.status(labels={"team": "install"})).budgets[0].spent_micros
    print("spent", asyncio.run(main()), md.version("bursar-client"))
""")


class InstallTest(unittest.TestCase):
    def run_ok(self, cmd, **kw) -> subprocess.CompletedProcess:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kw)
        self.assertEqual(p.returncode, 0, f"{' '.join(map(str, cmd))}:\n{p.stdout}\n{p.stderr}")
        return p

    def test_pip_install_and_use(self) -> None:
        py = VENV / "bin" / "python"
        if not py.exists():
            self.run_ok([sys.executable, "-m", "venv", str(VENV)])
        with tempfile.TemporaryDirectory(prefix="bursar-pip-") as tmp:
            # Build from a copy, so the build leaves nothing behind in the source tree.
            src = Path(tmp) / "python"
            shutil.copytree(PY_ROOT, src, ignore=shutil.ignore_patterns(
                "tests", "__pycache__", "build", "*.egg-info"))
            # Exactly what a user runs (pip builds it with setuptools in an isolated env).
            cmd = [str(py), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                   "--force-reinstall", "--no-deps"]
            self.run_ok(cmd + [str(src)])
        d = Daemon().start()
        try:
            env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
            env["BURSAR_SOCKET"] = d.socket
            prefix = str(VENV.resolve())
            p = self.run_ok([str(py), "-c", f"PREFIX = {prefix!r}\n" + SMOKE], cwd="/", env=env)
            self.assertEqual(p.stdout.split(), ["spent", "210", "0.1.0"])
        finally:
            d.cleanup()


if __name__ == "__main__":
    unittest.main()
