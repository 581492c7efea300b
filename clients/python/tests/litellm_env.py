"""The virtual environment with litellm that test_litellm.py runs its scenario in.

Installed once (a cold `pip install` downloads ~100 MB and takes one to four minutes here) and
kept as a cache: `$BURSAR_LITELLM_VENV`, default `<repo>/target/py/litellm-venv`. The version
is pinned (`$BURSAR_LITELLM_SPEC` to change it) because LiteLLM's callback API moves fast.
run.py starts the installation in the background before the other tests, so the two overlap.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from pathlib import Path
from typing import Optional

from harness import REPO_ROOT

SPEC = os.environ.get("BURSAR_LITELLM_SPEC", "litellm==1.106.2")
VENV = Path(os.environ.get("BURSAR_LITELLM_VENV", REPO_ROOT / "target" / "py" / "litellm-venv"))
MARKER = VENV / ".installed"
# litellm reads each model's price from its own table: keep it from fetching a newer one
# (no network beyond the local socket), and quiet.
ENV = {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR"}

_lock = threading.Lock()
_thread: Optional[threading.Thread] = None
_result: Optional[str] = None


def extra_requirement() -> str:
    """The `litellm` extra's requirement as pyproject.toml writes it (SPEC must satisfy it)."""
    text = (REPO_ROOT / "clients" / "python" / "pyproject.toml").read_text(encoding="utf-8")
    m = re.search(r'^litellm\s*=\s*\[\s*"([^"]+)"\s*\]', text, re.M)
    if not m:
        raise AssertionError("no `litellm = [...]` extra in clients/python/pyproject.toml")
    return m.group(1)


def venv_python() -> Path:
    return VENV / "bin" / "python"


def ready() -> bool:
    return venv_python().exists() and MARKER.exists() and MARKER.read_text().strip() == SPEC


def _install() -> str:
    if ready():
        return ""
    VENV.parent.mkdir(parents=True, exist_ok=True)
    steps = [
        [sys.executable, "-m", "venv", "--clear", str(VENV)],
        [str(venv_python()), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
         "--prefer-binary", SPEC],
        [str(venv_python()), "-c", "import litellm.integrations.custom_logger"],
    ]
    for cmd in steps:
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=480,
                               env={**os.environ, **ENV})
        except (OSError, subprocess.TimeoutExpired) as e:
            return f"`{' '.join(cmd[:5])}` failed: {e}"
        if p.returncode != 0:
            tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
            return f"`{' '.join(cmd[:5])}` exited {p.returncode}: {' | '.join(tail)}"
    MARKER.write_text(SPEC + "\n")
    return ""


def _run() -> None:
    global _result
    _result = _install()


def start() -> None:
    """Begin installing in the background (no-op when already installed or started)."""
    global _thread
    with _lock:
        if _thread is None and not ready():
            _thread = threading.Thread(target=_run, name="litellm-install", daemon=True)
            _thread.start()


def ensure() -> str:
    """Wait for the installation; '' when litellm is usable, else why not."""
    start()
    with _lock:
        t = _thread
    if t is None:
        return ""
    t.join()
    return _result or ""
