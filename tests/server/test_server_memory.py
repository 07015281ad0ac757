"""server.memory: the glibc malloc settings apply here (Linux) and leave results unchanged."""
from __future__ import annotations

import sys

import numpy as np
import pytest

from server.memory import keep_freed_memory


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_keep_freed_memory_applies_on_linux():
    assert keep_freed_memory() is True
    a = np.ones((375, 500, 3), np.uint8)   # allocations still work and hold their values
    assert int(a.sum()) == 375 * 500 * 3
