"""OpenVINO and the alternate signal stack (export.sigstack says what OpenVINO's CPU plugin does to it).

A process that loaded two OpenVINO models and freed them in the order it loaded them died of the next
signal it handled (SIGSEGV, no traceback): the first test runs that sequence in a child process, as a
server that reloads its models and is then asked to drain would."""
from __future__ import annotations

import ctypes
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO
from export import openvino_backend as ovb
from export.manifest import INPUT_NAME, OUTPUT_NAME
from export.sigstack import SIGNAL_STACK_BYTES, SS_DISABLE, StackT, current_signal_stack, ensure_signal_stack

pytest.importorskip("openvino")
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sigaltstack via glibc")


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    """A one-node ONNX model with the bundle's input and output names: enough for OpenVINO to compile."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", [INPUT_NAME], [OUTPUT_NAME])], "tiny",
                              [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, [None, 3])],
                              [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, [None, 3])])
    path = tmp_path_factory.mktemp("sigstack") / "model.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


CHILD = """
import gc, os, signal, sys
from export.openvino_backend import open_openvino
first = open_openvino(sys.argv[1], threads=1)
second = open_openvino(sys.argv[1], threads=1)
del first; gc.collect()
del second; gc.collect()
handled = []
signal.signal(signal.SIGUSR1, lambda *_: handled.append(1))
os.kill(os.getpid(), signal.SIGUSR1)
print("handled", len(handled), flush=True)
"""


def test_models_freed_in_load_order_leave_a_usable_signal_stack(tiny_onnx):
    """With a Core per load this child died of its SIGUSR1 (exit -11, nothing printed): freeing the first
    model's Core first left the thread's signal stack on memory OpenVINO had already unmapped."""
    proc = subprocess.run([sys.executable, "-c", CHILD, str(tiny_onnx)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO / "python")})
    assert (proc.returncode, proc.stdout.strip()) == (0, "handled 1"), proc.stderr[-2000:]


def test_the_shared_core_leaves_its_thread_a_large_mapped_stack(tiny_onnx):
    core = ovb.shared_core()
    assert ovb.shared_core() is core
    run = ovb.open_openvino(tiny_onnx, threads=1)
    got = run(np.array([[-1.0, 0.0, 2.0]], np.float32)).numpy()
    assert got.tolist() == [[0.0, 0.0, 2.0]]
    st = current_signal_stack()
    assert not st.ss_flags & SS_DISABLE and st.ss_size >= SIGNAL_STACK_BYTES
    # the stack is ours and mapped: writable from its lowest to its highest byte
    ctypes.memset(st.ss_sp, 0, st.ss_size)


def test_ensure_signal_stack_replaces_a_small_one_and_keeps_its_own():
    """What OpenVINO's plugin leaves (an 11-12 KB stack) is replaced; a second call finds its own in place."""
    small = ctypes.create_string_buffer(12 * 1024)
    before = current_signal_stack()
    try:
        assert ctypes.CDLL(None).sigaltstack(ctypes.byref(StackT(ctypes.addressof(small), 0, len(small))), None) == 0
        assert ensure_signal_stack() is True
        st = current_signal_stack()
        assert st.ss_size >= SIGNAL_STACK_BYTES and st.ss_sp != ctypes.addressof(small)
        assert ensure_signal_stack() is False
    finally:
        ctypes.CDLL(None).sigaltstack(ctypes.byref(before), None)
        ensure_signal_stack()
