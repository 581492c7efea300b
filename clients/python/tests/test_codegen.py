"""client.py is what scripts/unasync.py generates from aio.py, so the two clients cannot drift."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import tempfile
import unittest
from pathlib import Path

from harness import PY_ROOT

SCRIPT = PY_ROOT / "scripts" / "unasync.py"


def load_script():
    spec = importlib.util.spec_from_file_location("unasync", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class CodegenTest(unittest.TestCase):
    def test_client_py_is_generated_from_aio_py(self) -> None:
        unasync = load_script()
        expected = unasync.generate()
        actual = unasync.TARGET.read_text(encoding="utf-8")
        if actual != expected:
            self.fail(
                "bursar_client/client.py differs from what scripts/unasync.py generates from "
                "aio.py (edit aio.py, then run `python3 clients/python/scripts/unasync.py`):\n"
                + unasync.diff(expected, actual)
            )

    def test_check_mode_finds_and_rewrite_fixes_a_stale_client_py(self) -> None:
        with tempfile.TemporaryDirectory(prefix="bursar-unasync-") as tmp:
            root = Path(tmp)
            shutil.copytree(PY_ROOT / "scripts", root / "scripts")
            shutil.copytree(PY_ROOT / "bursar_client", root / "bursar_client",
                            ignore=shutil.ignore_patterns("__pycache__"))
            client = root / "bursar_client" / "client.py"
            client.write_text(client.read_text().replace(
                "return self._call(P.verify())", "return self._call(P.reload())"))
            script = [sys.executable, str(root / "scripts" / "unasync.py")]

            p = subprocess.run(script + ["--check"], capture_output=True, text=True, timeout=60)
            self.assertEqual(p.returncode, 1, p.stdout + p.stderr)
            self.assertIn("-        return self._call(P.reload())", p.stdout)
            self.assertIn("+        return self._call(P.verify())", p.stdout)
            self.assertIn("edit aio.py", p.stderr)

            p = subprocess.run(script, capture_output=True, text=True, timeout=60)
            self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
            self.assertEqual(client.read_text(), (PY_ROOT / "bursar_client" / "client.py").read_text())
            p = subprocess.run(script + ["--check"], capture_output=True, text=True, timeout=60)
            self.assertEqual(p.returncode, 0, p.stdout + p.stderr)

    def test_asyncio_code_the_table_does_not_translate_is_refused(self) -> None:
        unasync = load_script()
        source = unasync.SOURCE.read_text(encoding="utf-8")
        extra = "\n\nasync def both(a, b):\n    return await asyncio.gather(a, b)\n"
        with self.assertRaises(unasync.UnasyncError) as cm:
            unasync.unasync(source + extra)
        self.assertIn("'asyncio'", str(cm.exception))
        self.assertIn("return asyncio.gather(a, b)", str(cm.exception))


if __name__ == "__main__":
    unittest.main()
