"""Type stub for the compiled classify_native._core module (native/libtorch/python/bindings.cpp)."""
from typing import Any, Sequence, TypedDict

import numpy as np
import numpy.typing as npt

class NativeError(ValueError): ...
class BundleError(NativeError): ...
class ImageError(NativeError): ...
class OptionError(NativeError): ...

class View(TypedDict):
    resize: int | None
    crop: str
    flip: str

class TopK(TypedDict):
    index: int
    label: str
    prob: float

class Prediction(TypedDict):
    path: str
    probs: npt.NDArray[np.float32] | None  # (K,)
    topk: list[TopK]
    error: str | None

def decode_file(path: str) -> npt.NDArray[np.uint8]: ...  # (H, W, 3)
def decode_bytes(data: bytes, name: str = "<bytes>") -> npt.NDArray[np.uint8]: ...
def parse_tta_policy(name: str) -> list[View]: ...
def preprocess(image: npt.NDArray[np.uint8], crop_size: tuple[int, int], resize_size: int,
               interpolation: str = "bilinear", views: str | Sequence[dict[str, Any]] = "none",
               resize_kernel: str = "float32") -> npt.NDArray[np.uint8]: ...  # (V, 3, ch, cw)
def file_sha256(path: str) -> str: ...

class Runtime:
    def __init__(self, bundle_dir: str, format: str = "auto", tta: str | None = None, threads: int = 0,
                 device: str = "cpu", batch: int = 16, precision: str = "fp32", trusted_keys: list[str] = [],
                 require_signature: bool = False, expected_manifest_sha256: str = "") -> None: ...
    @property
    def classes(self) -> list[str]: ...
    @property
    def kind(self) -> str: ...
    @property
    def format(self) -> str: ...
    @property
    def device(self) -> str: ...  # cpu | cuda:N
    @property
    def merge(self) -> str: ...
    @property
    def views(self) -> list[View]: ...
    @property
    def preprocessing(self) -> dict[str, Any]: ...
    def predict_files(self, paths: Sequence[str], topk: int = 5) -> list[Prediction]: ...
    def predict_bytes(self, blobs: Sequence[bytes], topk: int = 5) -> list[Prediction]: ...
    # Pixel arrays must be uint8 (any other dtype: TypeError, never cast); a wrong shape: OptionError.
    def predict_array(self, images: npt.NDArray[np.uint8], topk: int = 5) -> list[Prediction]: ...  # (N, H, W, 3)
    def run_preprocessed(self, rows: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]: ...  # (N, 3, h, w) -> (N, K)
