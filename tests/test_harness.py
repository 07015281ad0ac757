"""The test process itself: the guards tests/conftest.py puts in place hold for every test."""
from __future__ import annotations

import ctypes
import sys

import pytest

from conftest import ALTSTACK_BYTES, _StackT

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sigaltstack via glibc")


def test_signal_handlers_get_the_large_guarded_stack():
    """faulthandler's own 16-18 KB signal stack does not hold a frame with AMX tile state plus a handler
    (conftest.pytest_configure says how CI died of it): the 1 MiB mapping must be the stack in place while
    tests run, not replaced by a later faulthandler or pytest setup."""
    cur = _StackT()
    assert ctypes.CDLL(None, use_errno=True).sigaltstack(None, ctypes.byref(cur)) == 0
    assert (cur.ss_size, cur.ss_flags) == (ALTSTACK_BYTES, 0)
