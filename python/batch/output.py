"""The output folder: Parquet part files written atomically, the done-manifest, the job's identity.

    OUT/_batch_job.json          what produced the parts (bundle sha256, TTA, top-k, probabilities kept)
    OUT/part-000000.parquet      rows, one per input image (schema below); more parts as the job runs
    OUT/.part-000001.parquet.tmp a part being written: renamed into place when complete, removed on resume
    OUT/_batch.lock              held (flock) while a job writes here: a second job is refused

A part is written to a temporary file in the same folder, flushed to disk and renamed: a reader (or a
resumed job) sees whole parts or nothing. The done-manifest is the ``path`` column of the committed
parts, read back at start: the commit of a part (its rename) and the record that its images are done
are one step, so a kill at any moment can neither lose rows nor repeat them. Files starting with ``_``
or ``.`` are skipped by Parquet dataset readers, so ``pyarrow.parquet.read_table(OUT)`` and
``pandas.read_parquet(OUT)`` read the rows only.

Row schema (docs/batch.md "Output"): ``path`` (string), ``label`` (top-1 class, null on error),
``topk_labels`` (list<string>), ``topk_probs`` (list<float32>), ``probs`` (list<float32>, every class
in manifest order; only with ``--save-probs``), ``error`` (null, or why the image could not be
read), ``bundle_name``, ``bundle_version``, ``bundle_sha256`` (of the bundle's manifest.json).
"""
from __future__ import annotations

import fcntl
import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from trainer.errors import UserError

JOB_FILE = "_batch_job.json"
LOCK_FILE = "_batch.lock"
PART_RE = re.compile(r"^part-(\d{6})\.parquet$")
OUTPUT_SCHEMA_VERSION = 1


class OutputError(UserError):
    """The output folder cannot be used for this job (another job's results, a file in the way)."""


@dataclass(frozen=True)
class JobIdentity:
    """What makes two runs the same job: resuming mixes their rows, so these must all agree."""
    bundle_name: str
    bundle_version: str
    bundle_sha256: str
    tta: str            # the views as data (JSON), so "hflip" and its explicit list compare equal
    merge: str
    topk: int
    save_probs: bool
    classes: tuple[str, ...]
    schema_version: int = OUTPUT_SCHEMA_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "JobIdentity":
        data = json.loads(text)
        data["classes"] = tuple(data["classes"])
        return cls(**data)


def row_schema(identity: JobIdentity) -> pa.Schema:
    fields = [pa.field("path", pa.string(), nullable=False), pa.field("label", pa.string()),
              pa.field("topk_labels", pa.list_(pa.string())), pa.field("topk_probs", pa.list_(pa.float32()))]
    if identity.save_probs:
        fields.append(pa.field("probs", pa.list_(pa.float32())))
    fields += [pa.field("error", pa.string()), pa.field("bundle_name", pa.string(), nullable=False),
               pa.field("bundle_version", pa.string(), nullable=False),
               pa.field("bundle_sha256", pa.string(), nullable=False)]
    meta = {"shipclassifier.classes": json.dumps(list(identity.classes)),
            "shipclassifier.job": identity.to_json()}
    return pa.schema(fields, metadata=meta)


def rows_table(identity: JobIdentity, paths: list[str], probs: np.ndarray, errors: list[str]) -> pa.Table:
    """paths, (N, K) float32 probabilities (rows of errors are ignored), per-image error or "" -> a table."""
    n, k = len(paths), len(identity.classes)
    topk = max(1, min(identity.topk, k))
    ok = np.array([not e for e in errors], dtype=bool)
    probs = np.asarray(probs, dtype=np.float32).reshape(n, k) if n else np.zeros((0, k), np.float32)
    # stable sort: equal probabilities keep class order (lowest index first), as export.loader does
    order = np.argsort(-probs, axis=1, kind="stable")[:, :topk]
    scores = np.take_along_axis(probs, order, 1)
    classes = identity.classes
    labels = [[classes[j] for j in row] if good else None for row, good in zip(order.tolist(), ok)]
    columns = {
        "path": pa.array(paths, pa.string()),
        "label": pa.array([row[0] if row else None for row in labels], pa.string()),
        "topk_labels": pa.array(labels, pa.list_(pa.string())),
        "topk_probs": _masked_lists(scores, ok),
    }
    if identity.save_probs:
        columns["probs"] = _masked_lists(probs, ok)
    columns["error"] = pa.array([e or None for e in errors], pa.string())
    for name in ("bundle_name", "bundle_version", "bundle_sha256"):
        columns[name] = pa.array([getattr(identity, name)] * n, pa.string())
    return pa.table(columns, schema=row_schema(identity))


def _masked_lists(values: np.ndarray, ok: np.ndarray) -> pa.Array:
    """(N, W) float32 -> list<float32> with a null list where ``ok`` is False (built from the flat buffer)."""
    n, w = values.shape
    offsets = pa.array(np.arange(0, (n + 1) * w, w, dtype=np.int32))
    lists = pa.ListArray.from_arrays(offsets, pa.array(values.reshape(-1), pa.float32()), mask=pa.array(~ok))
    return lists


class OutputFolder:
    """One job's output folder: checks or writes its identity, reads the done-manifest, commits parts."""

    def __init__(self, root: str | os.PathLike, identity: JobIdentity):
        self.root = Path(root)
        self.identity = identity
        self.schema = row_schema(identity)
        if self.root.exists() and not self.root.is_dir():
            raise OutputError(f"--out {self.root}: a file is in the way; name a folder")
        self.root.mkdir(parents=True, exist_ok=True)
        # one job per folder at a time: a second one would delete the first one's temporary parts
        self._lock = open(self.root / LOCK_FILE, "a")
        try:
            fcntl.flock(self._lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise OutputError(f"--out {self.root}: another python -m batch job is writing to this folder; wait "
                              "for it or use another --out") from None
        try:
            self._check_identity()
        except BaseException:
            self._lock.close()
            raise
        self.stale_temps = self._remove_temps()
        self._next = max((int(m.group(1)) for m in map(PART_RE.match, os.listdir(self.root)) if m), default=-1) + 1

    def _check_identity(self) -> None:
        job = self.root / JOB_FILE
        if job.is_file():
            try:
                before = JobIdentity.from_json(job.read_text(encoding="utf-8"))
            except (ValueError, TypeError, KeyError) as exc:
                raise OutputError(f"--out {self.root}: {JOB_FILE} is unreadable ({exc}); it was not written by "
                                  "python -m batch: use another --out") from None
            if before != self.identity:
                diff = [k for k in asdict(self.identity) if getattr(before, k) != getattr(self.identity, k)]
                raise OutputError(f"--out {self.root} holds the results of another job (it differs in: "
                                  f"{', '.join(diff)}); resuming would mix them: use another --out, or delete "
                                  "that folder to start over")
            return
        if self.part_files():
            raise OutputError(f"--out {self.root} holds part files but no {JOB_FILE}: use another --out")
        _atomic_write_bytes(job, self.identity.to_json().encode())

    def _remove_temps(self) -> int:
        """Temporary parts of a run that was killed mid-write: never committed, so never counted."""
        stale = [p for p in self.root.iterdir() if p.name.startswith(".part-") and p.name.endswith(".tmp")]
        for p in stale:
            p.unlink()
        return len(stale)

    def close(self) -> None:
        """Release the folder (the lock also goes when the process dies, however it dies)."""
        if not self._lock.closed:
            self._lock.close()

    def part_files(self) -> list[Path]:
        return sorted(p for p in self.root.iterdir() if PART_RE.match(p.name))

    def done_paths(self) -> set[str]:
        """The done-manifest: every path in a committed part (the ``path`` column only is read)."""
        done: set[str] = set()
        for part in self.part_files():
            done.update(pq.read_table(part, columns=["path"]).column("path").to_pylist())
        return done

    def commit(self, table: pa.Table) -> Path:
        """Write ``table`` as the next part: temporary file, fsync, rename, fsync of the folder."""
        name = f"part-{self._next:06d}.parquet"
        self._next += 1
        final = self.root / name
        tmp = self.root / f".{name}.tmp"
        with open(tmp, "wb") as fh:
            pq.write_table(table.cast(self.schema), fh, compression="zstd")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, final)
        _fsync_dir(self.root)
        return final


def read_output(root: str | os.PathLike) -> pa.Table:
    """Every committed row of an output folder as one table (the part files only)."""
    parts = sorted(p for p in Path(root).iterdir() if PART_RE.match(p.name))
    if not parts:
        raise OutputError(f"{root}: no part files")
    return pa.concat_tables([pq.read_table(p) for p in parts])


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
