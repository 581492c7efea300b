"""The wheel `python -m build --wheel` makes installs into a fresh venv and works, with no dependency.

CI (.ci/run) runs this through run-tests.sh: it is where the client's wheel is built.
`build` itself is installed once into target/py/build-venv (kept as a cache).
"""

from __future__ import annotations

import os
import runpy
import shutil
import subprocess
import sys
import tempfile
import textwrap
import unittest
import zipfile
from pathlib import Path

from harness import PY_ROOT, REPO_ROOT, Daemon
from litellm_env import extra_requirement

TOOLS = REPO_ROOT / "target" / "py" / "build-venv"
BUILD_SPEC = "build==1.6.1"
VERSION = runpy.run_path(str(PY_ROOT / "bursar_client" / "_version.py"))["__version__"]

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
    print("spent", asyncio.run(main()), md.version("bursar-client"), bursar_client.__version__)
    print("\\n".join(md.requires("bursar-client")))
""")


def clauses(requirement: str) -> set:
    """`litellm>=1,<2; extra == "x"` -> {">=1", "<2"} (the order pip writes them in varies)."""
    spec = requirement.split(";")[0].strip()[len("litellm"):]
    return {c.strip() for c in spec.split(",") if c.strip()}


class InstallTest(unittest.TestCase):
    def run_ok(self, cmd, **kw) -> subprocess.CompletedProcess:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kw)
        self.assertEqual(p.returncode, 0, f"{' '.join(map(str, cmd))}:\n{p.stdout}\n{p.stderr}")
        return p

    def build_tool(self) -> Path:
        py = TOOLS / "bin" / "python"
        marker = TOOLS / ".installed"
        if not (py.exists() and marker.exists() and marker.read_text().strip() == BUILD_SPEC):
            self.run_ok([sys.executable, "-m", "venv", "--clear", str(TOOLS)])
            self.run_ok([str(py), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                         BUILD_SPEC])
            marker.write_text(BUILD_SPEC + "\n")
        return py

    def test_wheel_builds_installs_into_a_fresh_venv_and_works(self) -> None:
        tools = self.build_tool()
        with tempfile.TemporaryDirectory(prefix="bursar-wheel-") as tmp:
            # Build from a copy, so the build leaves nothing behind in the source tree.
            src = Path(tmp) / "python"
            shutil.copytree(PY_ROOT, src, ignore=shutil.ignore_patterns(
                "tests", "__pycache__", "build", "dist", "*.egg-info"))
            dist = Path(tmp) / "dist"
            self.run_ok([str(tools), "-m", "build", "--wheel", "--outdir", str(dist), str(src)])
            wheels = [p.name for p in dist.iterdir()]
            self.assertEqual(wheels, [f"bursar_client-{VERSION}-py3-none-any.whl"])
            with zipfile.ZipFile(dist / wheels[0]) as z:
                packaged = {n for n in z.namelist() if not n.startswith(f"bursar_client-{VERSION}")}
            source = {f"bursar_client/{p.name}" for p in (PY_ROOT / "bursar_client").iterdir()
                      if p.suffix == ".py" or p.name == "py.typed"}
            self.assertEqual(packaged, source)

            venv = Path(tmp) / "venv"
            self.run_ok([sys.executable, "-m", "venv", str(venv)])
            py = venv / "bin" / "python"
            self.run_ok([str(py), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                         "--no-deps", "--no-index", str(dist / wheels[0])])
            d = Daemon().start()
            try:
                env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
                env["BURSAR_SOCKET"] = d.socket
                prefix = str(venv.resolve())
                p = self.run_ok([str(py), "-c", f"PREFIX = {prefix!r}\n" + SMOKE], cwd="/",
                                env=env)
            finally:
                d.cleanup()
        lines = p.stdout.splitlines()
        self.assertEqual(lines[0].split(), ["spent", "210", VERSION, VERSION])
        self.assertEqual([r.split(";")[0].strip()[:7] for r in lines[1:]], ["litellm"])
        self.assertEqual(clauses(lines[1]), clauses(extra_requirement()), lines[1])


if __name__ == "__main__":
    unittest.main()
