"""Typed settings for the HTTP front and the inference workers (one dataclass each, argparse on top)."""
from __future__ import annotations

import argparse
import math
import os
import socket
from dataclasses import dataclass, field

from trainer.image_formats import IMAGE_FORMATS   # torch-free, unlike trainer.data

from .layout import LayoutRequest


def trust_policy(trusted_keys, require_signature: bool):
    from export.signing import trust_policy as policy   # lazy: no export import when the config is only built

    return policy(trusted_keys, require_signature)



DEFAULT_FORMATS = IMAGE_FORMATS   # training's list (MPO included): one list, never a second copy
# fields whose flag is not "--" + the field name with dashes
FLAG_NAMES = {"drain_timeout_s": "--drain-timeout"}
MIN_TIMEOUT_S = 0.001
MAX_WAIT_S = 86400.0   # a day; far larger waits overflow threading's timeouts (OverflowError at run time)


def check_range(flag: str, value, low: float, high: float | None = None, note: str = "") -> None:
    """A numeric flag within [low, high] (finite: argparse's float() takes nan and inf), else a
    ValueError naming the flag, the bound and the value."""
    bound = f">= {low:g}" if high is None else f"between {low:g} and {high:g}"
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= low \
        and (high is None or value <= high)
    if not ok:
        raise ValueError(f"{flag} must be {bound}{f' ({note})' if note else ''}, got {value!r}")


@dataclass
class ServerConfig:
    bundles: list[str] = field(default_factory=list)
    redis_url: str | None = None          # None: embedded mode (in-process queue + worker thread)
    host: str = "127.0.0.1"
    port: int = 8000
    backend: str = "auto"                 # which bundle artifact runs in embedded mode
    precision: str = "auto"               # fp32, bf16 (openvino) or auto (export.load_bundle precision)
    # embedded mode's layout (server.layout.choose_layout); None: chosen at start-up per model
    threads: int | None = None            # intra-op threads of each runner's session
    runners: int | None = None            # batches in flight at once per model
    solo_threads: int | None = None       # threads of the lone-batch session (0: none)
    max_batch: int | None = None          # model rows per batched call
    max_delay_ms: float = 2.0             # how long a batch may wait to fill up
    max_queue: int = 256                  # queued jobs per model before 503 + Retry-After
    max_queue_rows: int = 1024            # queued model rows (images x TTA views) per model before 503
    drain_timeout_s: float = 30.0         # SIGTERM: readiness 503 at once, answer what is queued, exit by then
    timeout_s: float = 10.0               # request deadline from arrival (decoding included): 504 after it
    max_request_bytes: int = 32 * 1024 * 1024
    max_pixels: int = 40_000_000          # per decoded image (decompression bombs)
    max_images: int = 64                  # per request
    max_tta_views: int = 16               # views per image of a client-chosen TTA policy (ten-crop is 10)
    max_tta_scale: float = 2.0            # largest TTA resize, relative to the bundle's resize size
    max_request_pixels: int = 100_000_000  # per request: decoded + resized pixels, from the headers
    allowed_formats: tuple[str, ...] = DEFAULT_FORMATS
    jpeg_draft: bool = False              # decode JPEGs at a reduced DCT scale (faster, not bit-exact)
    prefix: str = "srv"                   # Redis key prefix
    reply_ttl_s: int = 60
    device: str = "cpu"                   # embedded mode: where the models run (cpu, cuda, cuda:N)
    api_keys: tuple[str, ...] = ()        # accepted API keys (--api-key, SERVER_API_KEY); empty: no auth
    trusted_keys: tuple[str, ...] = ()    # Ed25519 public key files: bundles' signatures are checked (--trusted-key)
    require_signature: bool = False       # refuse unsigned bundles (--require-signature)

    def validate(self) -> "ServerConfig":
        """Every setting in range, or a ValueError naming the flag, the bound and the value
        (``python -m server`` prints it and exits 2 before anything starts)."""
        if not self.bundles:
            raise ValueError("no model: pass --bundle DIR (a bundle written by `python -m export`)")
        for name, value, low, high, note in self._ranges():
            if value is not None:
                check_range(FLAG_NAMES.get(name, "--" + name.replace("_", "-")), value, low, high, note)
        if self.max_delay_ms >= self.timeout_s * 1000:
            raise ValueError(f"--max-delay-ms {self.max_delay_ms:g} is not below the request deadline --timeout-s "
                             f"{self.timeout_s:g}: every request would time out waiting for its batch to fill")
        trust_policy(self.trusted_keys, self.require_signature)   # unreadable key, or required without one
        return self

    def _ranges(self) -> list[tuple[str, object, float, float | None, str]]:
        """(field, value, lowest, highest or None, what the bound means) for every numeric setting."""
        return [
            ("port", self.port, 1, 65535, ""),
            ("threads", self.threads, 1, None, ""),
            ("runners", self.runners, 1, None, ""),
            ("solo_threads", self.solo_threads, 0, None, "0: no solo session"),
            ("max_batch", self.max_batch, 1, None, ""),
            ("max_delay_ms", self.max_delay_ms, 0, None, "0: no wait for a batch to fill"),
            ("max_queue", self.max_queue, 1, None, ""),
            ("max_queue_rows", self.max_queue_rows, 1, None, ""),
            ("drain_timeout_s", self.drain_timeout_s, 0, MAX_WAIT_S, "seconds"),
            ("timeout_s", self.timeout_s, MIN_TIMEOUT_S, MAX_WAIT_S, "seconds"),
            ("max_request_bytes", self.max_request_bytes, 1, None, ""),
            ("max_pixels", self.max_pixels, 1, None, ""),
            ("max_images", self.max_images, 1, None, ""),
            ("max_tta_views", self.max_tta_views, 1, None, ""),
            ("max_tta_scale", self.max_tta_scale, 1.0, None, "1: no TTA resize above the bundle's"),
            ("max_request_pixels", self.max_request_pixels, 1, None, ""),
            ("reply_ttl_s", self.reply_ttl_s, 1, None, "seconds a Redis reply is kept"),
        ]

    def layout_request(self) -> LayoutRequest:
        """The tuning flags as given (None: the server chooses; server.layout)."""
        return LayoutRequest(self.threads, self.runners, self.solo_threads, self.max_batch)


@dataclass
class WorkerConfig:
    redis_url: str
    bundles: list[str] = field(default_factory=list)
    backend: str = "auto"
    precision: str = "auto"
    threads: int | None = None
    max_batch: int = 32
    max_delay_ms: float = 2.0
    claim_idle_ms: int = 5000             # pending this long (a dead worker's entries) -> reclaimed
    max_deliveries: int = 3               # then dead-lettered, and the client gets an error
    consumer: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    prefix: str = "srv"
    reply_ttl_s: int = 60
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"       # where --metrics-port listens (0.0.0.0 for a scraper elsewhere)
    drain_timeout_s: float = 30.0         # SIGTERM: stop reading, finish and acknowledge the batch in hand
    device: str = "cpu"                   # where this worker's models run (cpu, cuda, cuda:N)
    trusted_keys: tuple[str, ...] = ()    # as ServerConfig
    require_signature: bool = False


def add_common_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", dest="bundles", action="append", default=[], metavar="DIR",
                   help="bundle directory (repeat for several models; the first is the default)")
    p.add_argument("--backend", default="auto",
                   help="export.load_bundle backend: auto, onnxruntime, onnxruntime-int8, openvino, openvino-int8, "
                        "torchscript, pt2 (python -m server: auto measures onnxruntime and OpenVINO at start-up and "
                        "keeps onnxruntime unless another is 1.1x faster; GET /models shows the figures)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="fp32, bf16 (backend openvino, on a CPU with native bf16) or auto: bf16 only where the CPU "
                        "has it natively and the bundle was exported with --verify-precision bf16, else fp32")
    p.add_argument("--threads", type=int, default=None,
                   help="intra-op threads per model (default: every core; python -m server: per runner, chosen at "
                        "start-up, see GET /models)")
    p.add_argument("--max-batch", type=int, default=32,
                   help="model rows per batched call (default 32; python -m server: chosen at start-up, 8 with "
                        "single-thread runners, else 32)")
    p.add_argument("--max-delay-ms", type=float, default=2.0, help="longest wait for a batch to fill")
    p.add_argument("--device", default="cpu",
                   help="where the models run: cpu, cuda or cuda:N (one process per GPU; refused at start-up "
                        "when that device is not usable here, never a silent CPU fallback). python -m server: "
                        "embedded mode only (a Redis front holds no weights)")
    p.add_argument("--trusted-key", dest="trusted_keys", action="append", default=[], metavar="PUB",
                   help="Ed25519 public key (PEM, from 'python -m export keygen') whose bundle signatures are "
                        "accepted; repeatable. A bundle's signature.json is then checked before it is loaded")
    p.add_argument("--require-signature", action="store_true",
                   help="refuse (at start-up, exit 2) any bundle not signed by a --trusted-key (docs/BUNDLE.md, Trust)")
    p.add_argument("--prefix", default="srv", help="Redis key prefix")
    p.add_argument("--reply-ttl-s", type=int, default=60)
