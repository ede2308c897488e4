"""Daemon threads that carry their name into the OS, so `top -H`, `ps -L` and /proc show which part of
the daemon uses the CPU (Python 3.11 keeps thread names to itself)."""

from __future__ import annotations

import ctypes
import sys
import threading
from collections.abc import Callable
from typing import Any

_PR_SET_NAME = 15  # prctl(2): name the calling thread (15 bytes + NUL)
_libc: Any = None
if sys.platform.startswith("linux"):
    try:
        _libc = ctypes.CDLL(None, use_errno=True)
    except OSError:  # a libc we cannot load only costs the names
        _libc = None


def name_this_thread(name: str) -> None:
    if _libc is not None:
        _libc.prctl(_PR_SET_NAME, ctypes.c_char_p(name.encode("ascii", "replace")[:15]), 0, 0, 0)


def start_thread(target: Callable[..., Any], name: str, args: tuple = ()) -> threading.Thread:
    """Start a daemon thread named `name` in Python and in the OS."""

    def run() -> None:
        name_this_thread(name)
        target(*args)

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    return thread
