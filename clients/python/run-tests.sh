#!/usr/bin/env bash
# Runs every test of the Python client (bursar_client) against a real bursard.
#
#   bash clients/python/run-tests.sh            # from anywhere; builds nothing
#
# Needs target/debug/bursard (cargo build -p bursard), or BURSARD=/path/to/bursard; with
# CARGO_TARGET_DIR set (as cargo honours it), $CARGO_TARGET_DIR/debug/bursard.
# PYTHON picks the interpreter (default python3, 3.9+). The LiteLLM test installs litellm into
# target/py/litellm-venv once (kept as a cache) and is skipped, saying why, when it cannot.
# The last line is the summary: "N passed, M failed" (", K skipped" when any were).
set -uo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
py="${PYTHON:-python3}"
target="${CARGO_TARGET_DIR:-$repo/target}"
case "$target" in /*) ;; *) target="$PWD/$target" ;; esac   # cargo reads it from the cwd too
export BURSARD="${BURSARD:-$target/debug/bursard}"
export PYTHONDONTWRITEBYTECODE=1

if [ ! -x "$BURSARD" ]; then
    echo "run-tests.sh: no bursard at $BURSARD (run \`cargo build -p bursard\` first)" >&2
    echo "0 passed, 1 failed"
    exit 1
fi
if ! "$py" -c 'import sys; sys.exit(sys.version_info < (3, 9))' 2>/dev/null; then
    echo "run-tests.sh: $py is missing or older than Python 3.9" >&2
    echo "0 passed, 1 failed"
    exit 1
fi

cd "$here/tests" && "$py" run.py "$@"
