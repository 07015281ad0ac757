"""Decode step: encoded image bytes -> (V, 3, H, W) uint8 views, exactly as the bundle manifest says.

Limits are checked from the header before any pixel is decoded (empty, unknown or disallowed
format, too many pixels). The accepted formats are training's (``trainer.data.images.IMAGE_FORMATS``,
MPO included). Decoding itself is ``trainer.data.images.decode_image`` (which also refuses a JPEG
with too many scans) and the crop is ``trainer.data.transforms.eval_transform`` /
``trainer.tta.apply_views``: the server never keeps a second copy of the preprocessing. With
``jpeg_draft`` a JPEG is decoded at the smallest DCT scale that still leaves the shorter side >= the
resize size (``decode_image(draft_size=...)``), which is several times faster for photos much larger
than the model input, at the cost of not being bit-exact.
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from trainer.data.images import IMAGE_FORMATS, ImageDecodeError, check_jpeg_scans, decode_image
from trainer.data.transforms import PreprocessSpec, eval_transform
from trainer.tta import TTAView, apply_views

from .errors import APIError


@dataclass(frozen=True)
class DecodeLimits:
    max_pixels: int = 40_000_000
    allowed_formats: tuple[str, ...] = IMAGE_FORMATS
    jpeg_draft: bool = False


def sniff(data: bytes, name: str, limits: DecodeLimits) -> tuple[str, int, int]:
    """Header check only: (format, width, height). Raises APIError 400/413/415."""
    if not data:
        raise APIError(400, f"{name}: empty image (0 bytes); send the file's contents")
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt, (w, h) = img.format or "?", img.size
    except Image.DecompressionBombError as exc:
        raise APIError(413, f"{name}: image dimensions are far above the limit of {limits.max_pixels / 1e6:.1f} "
                            f"megapixels (--max-pixels): possible decompression bomb ({exc})") from exc
    except Exception as exc:  # PIL raises many types for garbage headers
        raise APIError(415, f"{name}: not a recognised image ({len(data)} bytes); "
                            f"send one of {', '.join(limits.allowed_formats)}") from exc
    if fmt not in limits.allowed_formats:
        raise APIError(415, f"{name}: image format {fmt} is not accepted; send one of "
                            f"{', '.join(limits.allowed_formats)}")
    if w < 1 or h < 1:
        raise APIError(422, f"{name}: header declares an empty {w}x{h} image; the file is corrupt")
    if w * h > limits.max_pixels:
        raise APIError(413, f"{name}: {w}x{h} = {w * h / 1e6:.1f} megapixels is above the limit of "
                            f"{limits.max_pixels / 1e6:.1f} (--max-pixels); downscale it first")
    try:
        check_jpeg_scans(data, name)   # before any decoding: each scan is another pass over the image
    except ImageDecodeError as exc:
        raise APIError(422, str(exc)) from exc
    return fmt, w, h


def decode_rgb(data: bytes, name: str, spec: PreprocessSpec, limits: DecodeLimits,
               fmt: str | None = None) -> np.ndarray:
    """(H, W, 3) uint8, after the header checks (``fmt``: ``sniff`` already ran and said so)."""
    if fmt is None:
        fmt, _, _ = sniff(data, name, limits)
    try:
        return decode_image(data, name=name, draft_size=spec.resize_size if limits.jpeg_draft else None)
    except ImageDecodeError as exc:
        raise APIError(422, f"{exc}; the file may be truncated or corrupt") from exc


def to_views(rgb: np.ndarray, spec: PreprocessSpec, views: list[TTAView]) -> torch.Tensor:
    """(H, W, 3) uint8 -> (V, 3, cH, cW) uint8."""
    if len(views) == 1 and views[0] == TTAView():
        return eval_transform(rgb, spec).unsqueeze(0)
    try:
        return apply_views(rgb, spec, views)
    except ValueError as exc:
        raise APIError(422, str(exc)) from exc


def decode_to_views(data: bytes, name: str, spec: PreprocessSpec, views: list[TTAView],
                    limits: DecodeLimits, fmt: str | None = None) -> torch.Tensor:
    rgb = decode_rgb(data, name, spec, limits, fmt)
    if min(rgb.shape[:2]) < 1:
        raise APIError(422, f"{name}: decoded to an empty image {rgb.shape}")
    return to_views(rgb, spec, views)
