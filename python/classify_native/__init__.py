"""The native (C++/libtorch) bundle runtime, from Python.

    from classify_native import Runtime
    rt = Runtime("bundles/digits", tta="hflip", threads=2)
    for r in rt.predict_files(["a.png", "b.jpg"]):
        print(r["path"], r["topk"][0] if r["error"] is None else r["error"])

Build it with ``bash scripts/setup.sh`` (an editable install whose CMake build writes the compiled
``_core`` module next to this file) or install the package (``pip install --no-build-isolation .``).
Preprocessing, TTA and ensembles follow docs/BUNDLE.md exactly as the Python loader does; the GIL is
released while C++ decodes and runs the model, so threads calling one Runtime each get real parallelism
in the C++ part. The module is compiled against one torch build and refuses to load under another.
"""
from __future__ import annotations

BUILD_HINT = ("rebuild it against the installed torch: 'bash scripts/setup.sh' in a checkout, or "
              "'pip install --no-build-isolation --force-reinstall .' in the source folder")


def check_torch(built: str, running: str) -> None:
    """Refuse a torch other than the one the module was compiled against: libtorch has no stable C++ ABI,
    so a mismatch fails later with undefined symbols or, worse, loads and corrupts memory."""
    if built != running:
        raise ImportError(f"classify_native was built for torch {built} but torch {running} is installed; "
                          f"install torch=={built}, or {BUILD_HINT}")


try:
    from ._build_info import TORCH_VERSION as BUILT_FOR_TORCH
except ImportError as exc:  # pragma: no cover - exercised only on machines without the build
    raise ImportError(f"classify_native: the native build is missing ({exc}); {BUILD_HINT}") from exc

import torch  # noqa: E402  (the compiled module links this torch's libraries)

check_torch(BUILT_FOR_TORCH, torch.__version__)

try:
    from ._core import (BundleError, ImageError, NativeError, OptionError, Runtime, decode_bytes, decode_file,
                        file_sha256, parse_tta_policy, preprocess)
except ImportError as exc:  # pragma: no cover - exercised only on machines without the build
    raise ImportError(f"classify_native: the compiled module is missing or does not load ({exc}); "
                      f"{BUILD_HINT}") from exc

# load_bundle(..., backend="native") finds classify_native.backend:native_backend by name (export.loader.PLUGINS);
# this package does not import the export package (no import circle).

__all__ = ["Runtime", "NativeError", "BundleError", "ImageError", "OptionError", "decode_file", "decode_bytes",
           "preprocess", "parse_tta_policy", "file_sha256", "check_torch", "BUILT_FOR_TORCH"]
