"""Keep the calling thread's alternate signal stack across calls into libraries that replace it.

OpenVINO's CPU plugin installs an alternate signal stack of its own on the thread that compiles a model,
and puts back the one it found when the compiled model is destroyed. Destroyed in another order than
they were made (two models, the first freed first), the thread is left with a freed stack: the next
signal whose handler runs on the alternate stack (every Python-level handler, e.g. SIGCHLD or SIGINT,
and faulthandler's) cannot be delivered and the kernel kills the process with SIGSEGV, no traceback.
Wrapping those calls in :func:`kept_signal_stack` puts our stack back at once, so whatever the library
restores later is ours.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys
from contextlib import contextmanager
from typing import Iterator

SS_DISABLE = 2


class _StackT(ctypes.Structure):
    _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        lib.sigaltstack.argtypes = [ctypes.POINTER(_StackT), ctypes.POINTER(_StackT)]
        return lib
    except (OSError, AttributeError):
        return None


_LIBC = _libc()


def signal_stack() -> tuple[int | None, int, int] | None:
    """This thread's alternate signal stack as (address, flags, size); None where it cannot be read."""
    if _LIBC is None:
        return None
    cur = _StackT()
    if _LIBC.sigaltstack(None, ctypes.byref(cur)) != 0:
        return None
    return cur.ss_sp, cur.ss_flags, cur.ss_size


@contextmanager
def kept_signal_stack() -> Iterator[None]:
    """Run the body, then give the thread back the alternate signal stack it had before."""
    before = signal_stack()
    try:
        yield
    finally:
        after = signal_stack()
        if before is not None and after is not None and (after[0], after[2]) != (before[0], before[2]):
            old = _StackT(before[0], before[1] & SS_DISABLE, before[2])
            _LIBC.sigaltstack(ctypes.byref(old), None)
