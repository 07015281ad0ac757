"""One batch job: inputs -> what is not done yet -> an engine (embedded or Ray Data) -> committed parts.

    from batch import BatchOptions, run_batch
    summary = run_batch(BatchOptions(bundle="bundles/digits", images="data/photos", out="preds/"))

Both engines hand their rows to one ``PartSink``, which commits a part every ``part_size`` rows; the
output folder (batch.output) turns a rerun with the same ``out`` into a resume.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from export.manifest import read_manifest_bytes
from trainer.errors import UserError
from trainer.tta import parse_policy, views_from_data

from .inputs import list_inputs
from .output import JobIdentity, OutputFolder, rows_table
from .progress import Progress

log = logging.getLogger("batch")


@dataclass
class BatchOptions:
    bundle: str
    images: str
    out: str
    column: str = "path"             # the column of paths in a Parquet/CSV --images
    backend: str = "auto"            # export.load_bundle's backend
    tta: str | None = None           # None: the bundle's default views
    topk: int = 5
    save_probs: bool = False         # the full probability vector per row
    batch_size: int = 64             # images per model call (each brings its TTA views)
    workers: int = -1                # decode processes (embedded); -1: one per CPU core
    threads: int | None = None       # model threads (embedded: the backend's default; Ray: 1 per actor)
    part_size: int = 10_000          # rows per Parquet part (the unit of resume)
    device: str = "cpu"
    ray_address: str | None = None   # None: embedded; "auto", "ray://host:10001" or "local"
    ray_workers: int = 0             # Ray actors; 0: one per CPU (GPU with --device cuda) of the cluster
    progress: bool = True
    trusted_keys: list[str] = field(default_factory=list)
    require_signature: bool = False

    def check(self) -> None:
        for name, low in (("topk", 1), ("batch_size", 1), ("part_size", 1)):
            if getattr(self, name) < low:
                raise UserError(f"--{name.replace('_', '-')} must be >= {low} (got {getattr(self, name)})")
        if self.workers < -1:
            raise UserError(f"--workers must be >= 0, or -1 for one per CPU core (got {self.workers})")
        if self.threads is not None and self.threads < 1:
            raise UserError(f"--threads must be >= 1 (got {self.threads})")
        if self.ray_workers < 0:
            raise UserError(f"--ray-workers must be >= 0 (got {self.ray_workers})")


@dataclass
class BatchSummary:
    out: str
    total: int            # inputs listed (unique paths)
    skipped: int          # already in committed parts (a resume)
    written: int          # rows this run committed
    errors: int           # of those, error rows
    parts: int            # parts this run committed
    seconds: float
    engine: str

    @property
    def images_per_s(self) -> float:
        return self.written / self.seconds if self.seconds > 0 else 0.0


class PartSink:
    """Rows from an engine, in any order and any batch size -> a committed part every ``part_size`` rows.

    ``on_part(path, parts_so_far)`` runs after each commit (progress reporting; the tests use it to
    kill the process at a chosen point)."""

    def __init__(self, folder: OutputFolder, part_size: int, progress: Progress,
                 on_part: Callable[[str, int], None] | None = None):
        self.folder, self.part_size, self.progress, self.on_part = folder, part_size, progress, on_part
        self.paths: list[str] = []
        self.probs: list[np.ndarray] = []
        self.errors: list[str] = []
        self.written = self.error_rows = self.parts = 0

    def add(self, paths: list[str], probs: np.ndarray, errors: list[str]) -> None:
        self.paths += paths
        self.probs.append(np.asarray(probs, dtype=np.float32))
        self.errors += errors
        n_err = sum(1 for e in errors if e)
        for e in errors:
            if e:
                log.warning("unreadable image, written as an error row: %s", e)
        self.progress.update(len(paths), n_err)
        while len(self.paths) >= self.part_size:
            self._commit(self.part_size)

    def close(self) -> None:
        if self.paths:
            self._commit(len(self.paths))

    def _commit(self, n: int) -> None:
        probs = np.concatenate(self.probs)
        table = rows_table(self.folder.identity, self.paths[:n], probs[:n], self.errors[:n])
        path = self.folder.commit(table)
        self.written += n
        self.error_rows += sum(1 for e in self.errors[:n] if e)
        self.parts += 1
        self.paths, self.errors = self.paths[n:], self.errors[n:]
        self.probs = [probs[n:]]
        if self.on_part is not None:
            self.on_part(str(path), self.parts)


def job_identity(opts: BatchOptions) -> JobIdentity:
    """The identity of this job from the bundle's manifest alone (no model loaded: a Ray driver may have
    no GPU); every row records the sha256 of the manifest's bytes."""
    manifest, raw = read_manifest_bytes(opts.bundle)
    views = parse_policy(opts.tta) if opts.tta else views_from_data(manifest["tta"]["views"])
    identity = JobIdentity(
        bundle_name=manifest["name"], bundle_version=manifest["version"],
        bundle_sha256=hashlib.sha256(raw).hexdigest(),
        tta=json.dumps([v.to_dict() for v in views], sort_keys=True), merge=manifest["tta"]["merge"],
        topk=opts.topk, save_probs=opts.save_probs, classes=tuple(manifest["classes"]))
    return identity


def run_batch(opts: BatchOptions, on_part: Callable[[str, int], None] | None = None) -> BatchSummary:
    """Classify every input not yet in ``opts.out``; returns what this run did."""
    opts.check()
    t0 = time.monotonic()
    identity = job_identity(opts)
    inputs = list_inputs(opts.images, opts.column)
    folder = OutputFolder(opts.out, identity)
    try:
        if folder.stale_temps:
            log.info("%s: removed %d unfinished part(s) of an interrupted run", opts.out, folder.stale_temps)
        done = folder.done_paths()
        pending = [p for p in inputs.paths if p not in done]
        skipped = len(inputs.paths) - len(pending)
        if done:
            extra = len(done) - skipped
            log.info("%s: resuming: %d of %d inputs already done%s", opts.out, skipped, len(inputs.paths),
                     f" ({extra} done paths are not in this listing; kept)" if extra else "")
        engine = "ray" if opts.ray_address else "embedded"
        progress = Progress(len(inputs.paths), skipped, opts.progress)
        sink = PartSink(folder, opts.part_size, progress, on_part)
        if pending:
            if opts.ray_address:
                from .raydata import run_ray

                run_ray(opts, identity, pending, sink)
            else:
                from .embedded import run_embedded

                run_embedded(opts, identity, pending, sink)
        sink.close()
        progress.close()
    finally:
        folder.close()
    return BatchSummary(str(opts.out), len(inputs.paths), skipped, sink.written, sink.error_rows, sink.parts,
                        time.monotonic() - t0, engine)


def load_checked(opts: BatchOptions, identity: JobIdentity, threads: int | None):
    """load_bundle with this job's options; refuses a bundle whose manifest is not the one the job
    recorded (changed since the job started, or another copy on a Ray worker machine)."""
    from export import load_bundle
    from export.manifest import BundleError

    bundle = load_bundle(opts.bundle, backend=opts.backend, tta=opts.tta, threads=threads, device=opts.device,
                         trusted_keys=opts.trusted_keys, require_signature=opts.require_signature)
    _, raw = read_manifest_bytes(opts.bundle)
    got = hashlib.sha256(raw).hexdigest()
    if got != identity.bundle_sha256:
        raise BundleError(f"{opts.bundle}: manifest.json here has sha256 {got[:12]}..., the job's bundle has "
                          f"{identity.bundle_sha256[:12]}... (changed since the job started, or another copy on "
                          f"this machine {os.uname().nodename}); every worker must read the same bundle")
    return bundle
