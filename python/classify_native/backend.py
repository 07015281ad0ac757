"""The native runtime as a backend of the Python bundle loader (export.load_bundle).

    from export import load_bundle        # finds native_backend by name (export.loader.PLUGINS)
    bundle = load_bundle("bundles/digits", backend="native", threads=2)

The loader keeps decoding, preprocessing and TTA in Python and calls this backend for the model
itself ((N, 3, H, W) uint8 -> (N, K) probabilities), through the C++ Runtime (.pt2 when the bundle
has it, else TorchScript). For C++ end to end (decode and preprocessing too) use
classify_native.Runtime directly.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ._core import BundleError as NativeBundleError
from ._core import Runtime

BACKEND_NAME = "native"


def native_backend(folder: Path, manifest: dict, threads: int | None, device: str):
    """export.loader BackendFactory: the C++ Runtime's raw model call. The C++ side reads the bundle
    again; it must find the manifest bytes the loader checked (sha256, and signature when one is
    required), else it refuses: the artifacts it then hashes are the ones that manifest names."""
    from export.loader import loading_manifest_sha256
    from export.manifest import BundleError

    try:
        rt = Runtime(str(folder), format="auto", threads=threads or 0, device=device,
                     expected_manifest_sha256=loading_manifest_sha256())
    except NativeBundleError as exc:   # the loader's callers catch export.BundleError
        raise BundleError(str(exc)) from None

    def run(batch) -> np.ndarray:
        return rt.run_preprocessed(np.asarray(batch))  # uint8 checked there, never cast

    return run

