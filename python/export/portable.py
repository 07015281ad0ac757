"""Which CPUs and torch versions a CPU ``.pt2`` runs on: chosen at export, recorded, checked before loading.

    python -m export --checkpoint RUN/best.pt --out BUNDLE --format pt2 --pt2-isa avx2
    with inductor_options("avx2"): ...   # inductor compiles for x86-64-v3, thread count left to the runtime
    art["compiled_for"] = compiled_for("avx2")
    reason = pt2_problem(art)            # None, or why this machine cannot load it and what to do

AOTInductor compiles C++ for the exporting CPU (``-march=native`` plus the vector ISA flags of
the best ISA it finds) and links against the exporting torch, so a package copied to an older CPU
dies with an illegal instruction and one made by another torch release may not load. The export
therefore compiles for a named x86-64 level (``--pt2-isa``, default ``auto``: AVX2 where the CPU
has it), records the CPU features the code may use and the torch version, and every reader
(this module for Python and the server, runtime.cpp for C++) checks them before it opens the
package. Inductor also bakes ``torch.get_num_threads()`` into its OpenMP loops unless
``cpp.dynamic_threads`` is on; it is always on here so ``--threads`` at run time decides.
"""
from __future__ import annotations

import contextlib
import functools
import platform
import re
from pathlib import Path

import torch

from .manifest import BundleError

# x86-64 micro-architecture levels as /proc/cpuinfo names their features (sse3 is "pni", lzcnt "abm").
_V2 = ("cx16", "lahf_lm", "popcnt", "pni", "sse4_1", "sse4_2", "ssse3")
_V3 = _V2 + ("abm", "avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "movbe", "xsave")
_V4 = _V3 + ("avx512bw", "avx512cd", "avx512dq", "avx512f", "avx512vl")
# --pt2-isa -> (gcc -march, inductor cpp.simdlen: vector width, 0 = scalar kernels, features it needs)
ISAS = {
    "default": ("x86-64-v2", 0, _V2),
    "avx2": ("x86-64-v3", 256, _V3),
    "avx512": ("x86-64-v4", 512, _V4),
}
ISA_CHOICES = ("auto", "native", *ISAS)
# Flags that name instruction set extensions -march=native may use (not "ht", "hypervisor", ...).
_ISA_FLAG = re.compile(r"^(sse\w*|ssse3|pni|avx\w*|amx\w*|fma\w*|f16c|bmi\d|abm|lzcnt|movbe|popcnt|cx16|lahf_lm|"
                       r"xsave\w*|aes|vaes|pclmulqdq|vpclmulqdq|gfni|sha_ni|adx|rdrand|rdseed|clflushopt|clwb|"
                       r"movdir\w*|serialize|waitpkg|vnni|prefetchw|sse4a|xop|tbm)$")
RECOMPILE_HINT = "recompile it on this machine with 'python -m export recompile {bundle}'"


@functools.cache
def cpu_features() -> frozenset[str] | None:
    """The running CPU's feature flags as /proc/cpuinfo names them; None where that file is absent."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    line = re.search(r"^flags\s*:(.*)$", text, re.M)
    return frozenset(line.group(1).split()) if line else None


def _x86() -> bool:
    return platform.machine() in ("x86_64", "AMD64")


def resolve_isa(isa: str) -> str:
    """``auto`` -> ``avx2`` on an x86-64 CPU that has it, else ``default`` (x86) or ``native`` (other CPUs);
    refuses a level this CPU cannot run (the export could not verify what it wrote)."""
    if isa not in ISA_CHOICES:
        raise BundleError(f"--pt2-isa {isa!r}: use one of {', '.join(ISA_CHOICES)}")
    have = cpu_features()
    if isa == "auto":
        if not _x86():
            return "native"
        return "avx2" if have is None or set(ISAS["avx2"][2]) <= have else "default"
    if isa != "native":
        if not _x86():
            raise BundleError(f"--pt2-isa {isa} is an x86-64 level; this CPU is {platform.machine()}: use "
                              "--pt2-isa native (or auto)")
        missing = sorted(set(ISAS[isa][2]) - have) if have is not None else []
        if missing:
            raise BundleError(f"--pt2-isa {isa}: this CPU lacks {', '.join(missing)}, so the export could not "
                              "verify what it compiles; choose a lower level (--pt2-isa avx2 or default) or "
                              "export on a CPU that has it")
    return isa


@contextlib.contextmanager
def inductor_options(isa: str):
    """Inductor config for compiling a CPU .pt2 for ``isa`` (resolved): -march, vector width, and OpenMP
    loops that follow the runtime's thread count instead of the exporting process's."""
    from torch._inductor import config

    patch: dict = {"cpp.dynamic_threads": True}
    if isa in ISAS:
        march, simdlen, _ = ISAS[isa]
        patch.update({"cpp.march": march, "cpp.simdlen": simdlen})
    with config.patch(patch):
        yield


def _vec_isa_features(isa: str) -> tuple[str, list[str]]:
    """The vector ISA inductor picked under the current config and the CPU features its -m flags enable
    (AVX-512 may come with VNNI, BF16 or AMX where the exporting CPU has them)."""
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    vec = pick_vec_isa()
    flags = vec.build_arch_flags().split() if vec else []
    feats = [f[2:].replace("-", "_").replace("avx512bf16", "avx512_bf16").replace("avx512vnni", "avx512_vnni")
             for f in flags if f.startswith("-m")]
    return (str(vec) if vec else "none"), feats


def compiled_for(isa: str) -> dict:
    """The manifest's record of what a CPU .pt2 compiled under ``inductor_options(isa)`` needs."""
    with inductor_options(isa):
        vec, vec_feats = _vec_isa_features(isa)
    if isa in ISAS:
        march, _, base = ISAS[isa]
        features = sorted(set(base) | set(vec_feats))
    else:  # -march=native: anything the exporting CPU has
        march = "native"
        features = sorted(f for f in (cpu_features() or ()) if _ISA_FLAG.match(f)) or sorted(vec_feats)
    return {"cpu_isa": isa, "march": march, "vec_isa": vec, "cpu_features": features,
            "machine": platform.machine(), "torch": str(torch.__version__), "threads": "dynamic",
            "aten_cpu_capability": torch.backends.cpu.get_cpu_capability()}


def _major_minor(version: str) -> tuple[str, ...]:
    return tuple(str(version).split("+")[0].split(".")[:2])


def pt2_problem(art: dict, where: str = "") -> str | None:
    """Why this machine cannot load the CPU .pt2 ``art`` (None when it can). Bundles written before these
    records existed carry none and are not checked."""
    rec = art.get("compiled_for") or {}
    if art.get("format") != "aotinductor" or art.get("device", "cpu") != "cpu" or "cpu_isa" not in rec:
        return None
    name = f"{where}/{art['file']}" if where else art["file"]
    if rec.get("machine") and rec["machine"] != platform.machine():
        return f"{name} was compiled for {rec['machine']} CPUs, this one is {platform.machine()}"
    have = cpu_features()
    missing = sorted(set(rec.get("cpu_features") or ()) - have) if have is not None else []
    if missing:
        return (f"{name} was compiled for {rec['cpu_isa']} CPUs (-march={rec.get('march')}); this CPU lacks "
                f"{', '.join(missing)} and would stop with an illegal instruction")
    built = rec.get("torch")
    if built and _major_minor(built) != _major_minor(torch.__version__):
        return (f"{name} was compiled with torch {built}; this is torch {torch.__version__}, and AOTInductor "
                "packages only load in the torch release that built them")
    return None


def pt2_refusal(reason: str, bundle) -> str:
    """The one message for a .pt2 that cannot run here: the reason, and the fix."""
    return (f"{reason}; {RECOMPILE_HINT.format(bundle=bundle)} (or use the TorchScript or ONNX artifact: "
            "backend 'torchscript' / 'onnxruntime', classify --format torchscript)")
