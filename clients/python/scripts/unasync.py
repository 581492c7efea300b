#!/usr/bin/env python3
"""Write bursar_client/client.py, the blocking client, from bursar_client/aio.py, its asyncio twin.

    python3 clients/python/scripts/unasync.py           # rewrite client.py
    python3 clients/python/scripts/unasync.py --check   # exit 1 with a diff if client.py is stale

As httpcore's scripts/unasync.py does: the substitutions in SUBS, regular expressions applied
in order to the whole file. What differs between the flavours beyond syntax is I/O, kept in
bursar_client/_backend_async.py and _backend_sync.py under the same names but for the
``Async`` prefix, so renaming is enough. Every substitution must still match something (or the
table has gone stale), and the output must say nothing of asyncio any more.
Standard library only.
"""

from __future__ import annotations

import difflib
import re
import sys
from pathlib import Path
from typing import List, Tuple

PACKAGE = Path(__file__).resolve().parent.parent / "bursar_client"
SOURCE = PACKAGE / "aio.py"
TARGET = PACKAGE / "client.py"

SUBS: List[Tuple[str, str]] = [
    # What aio.py says of itself, in words only true of asyncio (first, before the words change).
    (
        re.escape('"""asyncio client for bursard: ``AsyncClient``, every method a coroutine."""'),
        '"""Blocking client for bursard: ``Client``, safe to share between threads."""',
    ),
    (
        re.escape(
            "# client.py is generated from this file by scripts/unasync.py: edit this one, then run\n"
        ),
        "# Generated from aio.py by scripts/unasync.py: do not edit; edit aio.py, then run\n",
    ),
    (
        re.escape("An asyncio connection to bursard, safe to share between the tasks of one event loop."),
        "A blocking connection to bursard, safe to share between threads.",
    ),
    # Syntax.
    (r"\basync def\b", "def"),
    (r"\basync with\b", "with"),
    (r"\basync for\b", "for"),
    (r"\bawait ", ""),
    (r"\b__aenter__\b", "__enter__"),
    (r"\b__aexit__\b", "__exit__"),
    # Names: the I/O backend, then AsyncConn -> Conn, AsyncClient -> Client, AsyncIterator -> ...
    (r"\b_backend_async\b", "_backend_sync"),
    (r"\bAsync([A-Z]\w*)", r"\1"),
]

# Left over after SUBS, any of these means aio.py grew something the table does not translate.
LEFTOVER = re.compile(r"\basync\b|\bawait\b|\basyncio\b|\bAsync|\b__a\w+__\b|\bcoroutines?\b")


class UnasyncError(Exception):
    pass


def unasync(text: str) -> str:
    """The blocking twin of asyncio source ``text``."""
    for pattern, repl in SUBS:
        text, n = re.subn(pattern, repl, text)
        if n == 0:
            raise UnasyncError(f"unasync.py: substitution {pattern!r} matched nothing in aio.py")
    for lineno, line in enumerate(text.splitlines(), 1):
        m = LEFTOVER.search(line)
        if m:
            raise UnasyncError(
                f"unasync.py: line {lineno} of the output still says {m.group(0)!r} (add a "
                f"substitution, or move the asyncio-only code to _backend_async.py): {line.strip()}"
            )
    return text


def generate() -> str:
    return unasync(SOURCE.read_text(encoding="utf-8"))


def diff(expected: str, actual: str) -> str:
    return "".join(
        difflib.unified_diff(
            actual.splitlines(keepends=True),
            expected.splitlines(keepends=True),
            fromfile="bursar_client/client.py (as it is)",
            tofile="bursar_client/client.py (generated from aio.py)",
        )
    )


def main(argv: List[str]) -> int:
    check = argv == ["--check"]
    if argv and not check:
        print("usage: unasync.py [--check]", file=sys.stderr)
        return 2
    try:
        expected = generate()
    except UnasyncError as e:
        print(e, file=sys.stderr)
        return 1
    actual = TARGET.read_text(encoding="utf-8") if TARGET.exists() else ""
    if check:
        if actual != expected:
            sys.stdout.write(diff(expected, actual))
            print(
                "client.py is not what scripts/unasync.py generates from aio.py: edit aio.py, "
                "then run `python3 clients/python/scripts/unasync.py`",
                file=sys.stderr,
            )
            return 1
        return 0
    if actual != expected:
        TARGET.write_text(expected, encoding="utf-8")
        print(f"wrote {TARGET}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
