"""A usable alternate signal stack for the calling thread, whatever OpenVINO did to it.

OpenVINO's CPU plugin, when an ``ov.Core`` first uses it, gives the calling thread an alternate signal
stack of SIGSTKSZ + AT_MINSIGSTKSZ bytes (11,568 on a 2-core AMD EPYC here), and when that Core is
destroyed it unmaps the stack and puts back the one it replaced. Two ways this kills a process (the
first reproduced by tests/export/test_sigstack.py; the second needs an AMX CPU):

- Cores destroyed out of creation order (``c1 = Core(); c2 = Core(); del c1; del c2``) leave the thread's
  stack pointing at c1's unmapped memory. The next signal handled on that thread (SIGTERM to a draining
  server, Ctrl-C, a child's exit under a Python SIGCHLD handler) ends the process with SIGSEGV, and
  faulthandler cannot report it: its handler needs the same stack. The test suite's process ran that way
  from the OpenVINO tests on, and CI died with no traceback.
- Python runs every handler it installs on the alternate stack (CPython sets SA_ONSTACK). Once a thread
  has run AMX (bf16 on Intel Xeons since Sapphire Rapids) the kernel saves 8 KB of tile state in each of
  its signal frames, and frame plus handler no longer fit in 11.6 KB.

``export.openvino_backend`` therefore keeps one Core per process (OpenVINO's own advice) and calls
``ensure_signal_stack`` right after the CPU plugin loads: the thread gets a 256 KiB stack above a
PROT_NONE guard page (an overflow faults cleanly instead of writing over a neighbour), mapped for as long
as the thread lives. No-op off Linux.
"""
from __future__ import annotations

import ctypes
import mmap
import sys
import threading

SIGNAL_STACK_BYTES = 256 * 1024
SS_ONSTACK, SS_DISABLE = 1, 2


class StackT(ctypes.Structure):
    """glibc's stack_t."""
    _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]


_local = threading.local()   # .stack: (mmap region, usable base address, usable size) of this thread's own stack
_libc = None


def _c():
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def current_signal_stack() -> StackT:
    """The calling thread's alternate signal stack as the kernel has it (ss_flags SS_DISABLE: none)."""
    st = StackT()
    if _c().sigaltstack(None, ctypes.byref(st)) != 0:
        raise OSError(ctypes.get_errno(), "sigaltstack: could not read this thread's signal stack")
    return st


def ensure_signal_stack(size: int = SIGNAL_STACK_BYTES) -> bool:
    """Make this thread's alternate signal stack one mapped here, of at least ``size`` bytes, with a guard
    page below it. True when it had to be (re)installed; False when it already was, off Linux, or while a
    handler runs on the current one (the kernel refuses a change then)."""
    if not sys.platform.startswith("linux"):
        return False
    cur = current_signal_stack()
    mine = getattr(_local, "stack", None)
    if mine is not None and mine[2] >= size and cur.ss_sp == mine[1] and cur.ss_size == mine[2] \
            and not cur.ss_flags & SS_DISABLE:
        return False
    if cur.ss_flags & SS_ONSTACK:
        return False
    if mine is None or mine[2] < size:
        page = mmap.PAGESIZE
        region = mmap.mmap(-1, size + page, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        base = ctypes.addressof(ctypes.c_char.from_buffer(region))
        if _c().mprotect(ctypes.c_void_p(base), ctypes.c_size_t(page), 0) != 0:
            raise OSError(ctypes.get_errno(), "mprotect: could not make the signal stack's guard page")
        mine = (region, base + page, size)
    if _c().sigaltstack(ctypes.byref(StackT(mine[1], 0, mine[2])), None) != 0:
        raise OSError(ctypes.get_errno(), f"sigaltstack: the kernel refused a {mine[2]}-byte signal stack")
    _local.stack = mine   # only now may a smaller stack of ours that was in place be unmapped
    return True
