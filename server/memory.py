"""Process memory: glibc malloc settings for the serving processes, returning freed memory after a
burst, and the memory limit the process runs under (cgroup or physical memory).

Malloc settings (``keep_freed_memory``). Every request allocates a few arrays of hundreds of kB
(the decoded image, the resized copy, the batch). With glibc's defaults such blocks come from mmap
or from the top of the heap, which is trimmed back to the OS after each free, so every request pays
for fresh pages: measured here, decode + resize of a 500x375 JPEG took 2.7-3.0 ms that way and
1.4 ms with a high trim threshold (the memory stays in the process for the next request instead).
That threshold also keeps what a burst of large images freed (a 36-megapixel PNG decodes through
~500 MB of PIL blocks and arrays), in every malloc arena a request thread used: 16 such requests
left the serving process at 3.9 GiB for good. So:

- the number of arenas is bounded (``M_ARENA_MAX``, 2 x cores unless ``MALLOC_ARENA_MAX`` is set in
  the environment, which glibc reads itself): each arena keeps its own freed memory, and glibc's
  default of 8 x cores lets the 64 HTTP threads spread a burst over 16 arenas on 2 cores;
- ``IdleTrimmer`` calls ``malloc_trim(0)`` once the process has gone quiet after a burst (no
  decoding in flight for ``quiet_s``), which returns the free pages of every arena, middle of the
  heap included; between bursts nothing is trimmed and small requests keep their fast pages. A
  lower trim threshold instead does not do it: with 64 MiB, RSS stayed at 1.6-2x idle after a
  burst (freed blocks in the middle of a heap are never trimmed automatically).

The figures that chose these (``benchmarks/memory.py``) are in docs/server.md, section Memory.

Memory limit (``memory_limit``): the tightest of the cgroup v2 ``memory.max``, the cgroup v1
``memory.limit_in_bytes`` (of this process's cgroup and each of its ancestors, found through
/proc/self/cgroup and /proc/self/mountinfo) and the physical memory.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import math
import os
import sys
import threading
import time
from pathlib import Path

log = logging.getLogger("server")

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8

# cgroup v1 writes "no limit" as the largest page-aligned signed 64-bit value; anything this big is none
UNLIMITED = 1 << 62


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    except (OSError, AttributeError):   # not glibc (musl has no mallopt/malloc_trim)
        return None
    return libc


def default_arena_max() -> int:
    return 2 * (os.cpu_count() or 1)


def keep_freed_memory(mmap_threshold: int = 32 * 1024 * 1024, trim_threshold: int = 512 * 1024 * 1024,
                      arena_max: int | None = None) -> bool:
    """Serve blocks below mmap_threshold from the heap, keep up to trim_threshold of free heap per
    arena, and use at most ``arena_max`` arenas (None: 2 x cores unless MALLOC_ARENA_MAX is set; 0: leave
    glibc's setting).

    Returns False (and changes nothing) where the C library is not glibc."""
    libc = _libc()
    if libc is None:
        return False
    if arena_max is None:   # MALLOC_ARENA_MAX in the environment (glibc reads it at start-up) wins
        arena_max = 0 if os.environ.get("MALLOC_ARENA_MAX") else default_arena_max()
    ok = bool(libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold)) and bool(libc.mallopt(M_TRIM_THRESHOLD, trim_threshold))
    if arena_max > 0:
        ok = bool(libc.mallopt(M_ARENA_MAX, arena_max)) and ok
    return ok


def malloc_trim() -> bool:
    """Give the free pages of every malloc arena back to the OS; True if any were."""
    libc = _libc()
    return bool(libc.malloc_trim(0)) if libc is not None else False


class IdleTrimmer:
    """Calls ``trim`` once the process is quiet after a burst: ``burst_ended()`` arms it, and a
    background thread trims after ``quiet_s`` with no other ``burst_ended()`` and ``busy()`` false
    (checked again every ``quiet_s`` while busy: a trim while large blocks are in use would only
    hand back pages the next decode faults in again)."""

    def __init__(self, busy, quiet_s: float = 1.0, trim=malloc_trim):
        self.busy, self.quiet_s, self.trim = busy, quiet_s, trim
        self.trims = 0
        self._armed = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._last_burst = 0.0

    def burst_ended(self) -> None:
        with self._lock:
            self._last_burst = time.monotonic()
            if self._thread is None:   # started on first use: no thread in processes that never burst
                self._thread = threading.Thread(target=self._loop, name="memory-trim", daemon=True)
                self._thread.start()
        self._armed.set()

    def _loop(self) -> None:
        while True:
            self._armed.wait()
            quiet_for = time.monotonic() - self._last_burst
            if quiet_for < self.quiet_s or self.busy():
                time.sleep(self.quiet_s - quiet_for if quiet_for < self.quiet_s else self.quiet_s)
                continue
            self._armed.clear()
            t0 = time.perf_counter()
            self.trim()
            self.trims += 1
            log.debug("memory: malloc_trim after a burst took %.1f ms", (time.perf_counter() - t0) * 1e3)


def parse_size(text: str) -> int:
    """'1G', '1.5GiB', '512M', '300000000' -> bytes (K, M, G, T are powers of 1024)."""
    s = str(text).strip().upper().removesuffix("IB").removesuffix("B")
    scale = 1
    if s and s[-1] in "KMGT":
        scale, s = 1024 ** ("KMGT".index(s[-1]) + 1), s[:-1]
    try:
        value = float(s)
    except ValueError:
        raise ValueError(f"not a size: {text!r}; write bytes or a number with K, M, G (powers of 1024), "
                         "such as 1G or 512M") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"not a size: {text!r}")
    return int(value * scale)


# -- the memory limit of this process ---------------------------------------------------------------
def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text == "max":
        return None
    try:
        value = int(text)
    except ValueError:
        return None
    return None if value >= UNLIMITED else value


def _mounts(proc: Path) -> list[tuple[str, str, str, str]]:
    """(mount root, mount point, fs type, super options) of every mount in /proc/self/mountinfo."""
    out = []
    try:
        lines = (proc / "self" / "mountinfo").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        pre, sep, post = line.partition(" - ")
        fields, tail = pre.split(), post.split()
        if sep and len(fields) >= 5 and len(tail) >= 3:
            out.append((fields[3], fields[4], tail[0], tail[2]))
    return out


def _cgroup_limit(root: Path, proc: Path, version: int) -> tuple[int | None, str | None]:
    """The tightest limit on this process's cgroup and its ancestors under one cgroup version."""
    try:
        lines = (proc / "self" / "cgroup").read_text().splitlines()
    except OSError:
        return None, None
    path = None
    for line in lines:
        hid, _, rest = line.partition(":")
        controllers, _, cg_path = rest.partition(":")
        if version == 2 and hid == "0" and controllers == "":
            path = cg_path
        elif version == 1 and "memory" in controllers.split(","):
            path = cg_path
    if path is None:
        return None, None
    fs, name = ("cgroup2", "memory.max") if version == 2 else ("cgroup", "memory.limit_in_bytes")
    best: tuple[int | None, str | None] = (None, None)
    for mount_root, mount_point, fstype, options in _mounts(proc):
        if fstype != fs or (version == 1 and "memory" not in options.split(",")):
            continue
        # this process's cgroup seen through the mount: the path below the mount's own root
        rel = os.path.relpath(path, mount_root) if path.startswith(mount_root) else None
        if rel is None or rel.startswith(".."):
            continue
        parts = () if rel == "." else Path(rel).parts
        for depth in range(len(parts), -1, -1):   # this cgroup first, then each ancestor up to the mount
            shown = Path(mount_point, *parts[:depth], name)
            value = _read_int(root / shown.relative_to("/"))
            if value is not None and (best[0] is None or value < best[0]):
                best = (value, str(shown))
    return best


def physical_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def memory_limit(root: str | Path = "/", physical: int | None = None) -> tuple[int, str]:
    """(bytes, where from): the tightest of cgroup v2 memory.max, cgroup v1 memory.limit_in_bytes
    (this process's cgroup or an ancestor's) and the physical memory. ``root`` prefixes every path
    (tests point it at a fake tree)."""
    root = Path(root)
    proc = root / "proc"
    limit, source = physical if physical is not None else physical_memory(), "physical memory"
    for version in (2, 1):
        value, where = _cgroup_limit(root, proc, version)
        if value is not None and value < limit:
            limit, source = value, f"cgroup v{version} {where}"
    return limit, source
