"""A persistent, header-only index of a dataset's images, so start-up does not decode the dataset.

    python -m trainer check-data --data data/digits      # the full decode check (parallel, progress bar)

Before the first step the trainer only reads each image's header (format and size, a few hundred
bytes), and only for files it has not seen before: the results are kept in an index file under
``$SHIPCLASSIFIER_CACHE`` (default ``~/.cache/shipclassifier``), keyed by each file's path, size
and modification time, so a resumed or repeated run re-reads nothing but changed files. Under DDP
every rank reads the headers of its own share of the new files and the ranks exchange the results.
Files whose pixels turn out to be damaged later are reported by the training loop at the end of
the epoch (see ``ImageSamples``).
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image

from .images import IMAGE_FORMATS, ImageDecodeError, decode_image, format_refusal

INDEX_FORMAT = "shipclassifier.image-index/2"   # /2: entries of formats outside IMAGE_FORMATS are errors


def cache_root() -> Path:
    base = os.environ.get("SHIPCLASSIFIER_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "shipclassifier")
    return Path(base)


def index_path(data: str) -> Path:
    key = hashlib.sha256(os.path.abspath(data).encode()).hexdigest()[:20]
    return cache_root() / "index" / f"{key}.json"


def read_header(path: str) -> tuple[int, int, str | None]:
    """(width, height, None) from the file's header, or (0, 0, message naming the file)."""
    try:
        with Image.open(path) as img:
            (w, h), fmt = img.size, img.format
    except OSError as exc:
        reason = exc.strerror if isinstance(exc, FileNotFoundError) else None
        if isinstance(exc, Image.UnidentifiedImageError):
            reason = "not a recognised image format"
        return 0, 0, f"{path}: unreadable image ({reason or exc})"
    except (SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as exc:
        return 0, 0, f"{path}: unreadable image ({exc or type(exc).__name__})"
    if fmt not in IMAGE_FORMATS:
        return 0, 0, format_refusal(path, fmt)
    if w <= 0 or h <= 0:
        return 0, 0, f"{path}: unreadable image (size {w}x{h})"
    return w, h, None


def _stat_key(path: str) -> list[int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


class ImageIndex:
    """path -> (width, height, error or None), built from headers and cached across runs."""

    def __init__(self, entries: dict[str, tuple[int, int, str | None]], reused: int, read: int):
        self.entries, self.reused, self.read = entries, reused, read

    def bad(self, paths: list[str]) -> list[str]:
        return [self.entries[p][2] for p in paths if self.entries[p][2]]

    def decoded_bytes(self, paths: list[str]) -> int:
        return sum(self.entries[p][0] * self.entries[p][1] * 3 for p in paths)


def build_index(data: str, paths: list[str], rank: int = 0, world_size: int = 1, gather=None,
                workers: int | None = None) -> ImageIndex:
    """Header-check the files the cache does not know (this rank's share of them) and update the cache.

    ``gather(obj) -> list`` exchanges the ranks' results (torch.distributed.all_gather_object); only
    rank 0 writes the cache file."""
    cache_file = index_path(data)
    cached: dict = {}
    try:
        raw = json.loads(cache_file.read_text(encoding="utf-8"))
        if raw.get("format") == INDEX_FORMAT:
            cached = raw["files"]
    except (OSError, ValueError, KeyError, TypeError):
        cached = {}   # no cache yet, or an unreadable one: rebuild it
    entries: dict[str, tuple[int, int, str | None]] = {}
    keys: dict[str, list[int] | None] = {}
    todo = []
    for p in paths:
        key = keys[p] = _stat_key(p)
        hit = cached.get(p)
        if key is None:
            entries[p] = (0, 0, f"{p}: cannot open (no such file or not readable)")
        elif hit is not None and hit[:2] == key:
            entries[p] = (hit[2], hit[3], hit[4])
        else:
            todo.append(p)
    mine = todo[rank::world_size]
    with ThreadPoolExecutor(max_workers=workers or min(16, (os.cpu_count() or 1) * 2)) as pool:
        found = dict(zip(mine, pool.map(read_header, mine, chunksize=256)))
    if gather is not None and world_size > 1:
        for part in gather(found):
            found.update(part)
    entries.update(found)
    if rank == 0 and todo:
        files = {p: [*keys[p], *entries[p]] for p in paths if keys[p] is not None}
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_name(f".{cache_file.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"format": INDEX_FORMAT, "data": os.path.abspath(data), "files": files}),
                           encoding="utf-8")
            os.replace(tmp, cache_file)
        except OSError as exc:  # a read-only home must not stop training; the next run re-reads headers
            print(f"warning: cannot write the image index {cache_file} ({exc}); set SHIPCLASSIFIER_CACHE",
                  file=sys.stderr)
    return ImageIndex(entries, reused=len(paths) - len(todo), read=len(todo))


def _decode_error(path: str) -> str | None:
    try:
        decode_image(path)
    except ImageDecodeError as exc:
        return str(exc)
    return None


def check_decode(paths: list[str], workers: int | None = None, progress: bool = True) -> list[str]:
    """Fully decode every file in parallel (threads: the decoders release the GIL); one message per bad file."""
    from tqdm import tqdm

    bad = []
    with ThreadPoolExecutor(max_workers=workers or min(16, (os.cpu_count() or 1) * 2)) as pool:
        results = pool.map(_decode_error, paths, chunksize=32)
        for err in tqdm(results, total=len(paths), desc="decoding", unit="img", disable=not progress,
                        mininterval=1.0):
            if err:
                bad.append(err)
    return bad
