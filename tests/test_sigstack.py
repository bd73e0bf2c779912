"""The thread's alternate signal stack survives OpenVINO: its CPU plugin installs a stack of its own when
it loads and puts back the one it found when its Core is destroyed, so two backends freed in the order
they were made left the thread on a freed stack, and the next Python signal handler (here SIGCHLD, as
torch's DataLoader installs) killed the process with SIGSEGV and no traceback (the suite died so in CI)."""
from __future__ import annotations

import ctypes
import subprocess
import sys
import textwrap

import pytest

from flare_rt.sigstack import _StackT, kept_signal_stack, signal_stack

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sigaltstack: Linux only")


def _install(buf) -> None:
    libc = ctypes.CDLL(None)
    libc.sigaltstack.argtypes = [ctypes.POINTER(_StackT), ctypes.POINTER(_StackT)]
    assert libc.sigaltstack(ctypes.byref(_StackT(ctypes.addressof(buf), 0, len(buf))), None) == 0


def test_a_replaced_stack_is_put_back():
    before = signal_stack()
    foreign = ctypes.create_string_buffer(1 << 16)
    with kept_signal_stack():
        _install(foreign)
        assert signal_stack()[0] == ctypes.addressof(foreign)
    assert signal_stack() == before
    with kept_signal_stack():  # nothing changed: nothing done
        pass
    assert signal_stack() == before


def test_a_stack_put_back_after_an_error_too():
    before = signal_stack()
    foreign = ctypes.create_string_buffer(1 << 16)
    with pytest.raises(RuntimeError), kept_signal_stack():
        _install(foreign)
        raise RuntimeError
    assert signal_stack() == before


PROBE = textwrap.dedent("""
    import faulthandler, gc, signal, subprocess, sys
    import numpy as np
    faulthandler.enable()  # as pytest does: Python's handlers run on this alternate stack
    from flare_rt.backends import create_backend
    from flare_rt.bundle import Bundle
    from flare_rt.resources import packaged_model
    from flare_rt.sigstack import signal_stack
    before = signal_stack()
    bundle = Bundle.load(packaged_model())
    a = create_backend(bundle, "openvino", "cpu", threads=1)
    b = create_backend(bundle, "openvino", "cpu", threads=1)
    a(np.zeros((1, 1, *bundle.meta.patch_size), np.float32))
    del a; gc.collect()  # freed in the order made: the plugin of b restores a's (freed) stack
    del b; gc.collect()
    got = []
    signal.signal(signal.SIGCHLD, lambda *_: got.append(1))
    subprocess.run(["true"], check=True)  # SIGCHLD: delivered on the alternate stack (or SIGSEGV: exit -11)
    print("alive", len(got) > 0, signal_stack() == before)
""")


def test_openvino_backends_freed_in_any_order_leave_signals_deliverable():
    pytest.importorskip("openvino")  # the dev extra installs it (a skip fails under FLARE_RT_STRICT_SKIPS)
    r = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, f"exit {r.returncode} (-11: SIGSEGV): {r.stderr[-2000:]}"
    assert r.stdout.strip() == "alive True True"
