"""C++ CPU kernels (engine/csrc/), compiled on first use and cached; the torch code in
`engine.attention` stays the reference and the fallback.

The extension is built once per source/flags/torch version into
``$HALFMOON_CACHE/torch_extensions/`` (needs a C++ compiler and ``ninja``). ``-mavx2 -mfma`` (and the AVX-512 VNNI / BF16 set
of the quantized GEMMs, engine/csrc/qgemm.cpp) are added only when this CPU has them (never ``-march=native``: the cache may be shared). If the
build fails, or ``HALFMOON_DISABLE_CPU_KERNELS=1`` is set, `kernels()` returns None (the build
failure is logged once as a warning) and the callers use the torch path.
"""
from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import threading
from pathlib import Path
from types import ModuleType

import torch

from engine.loader import cache_root

log = logging.getLogger(__name__)

DISABLE_ENV = "HALFMOON_DISABLE_CPU_KERNELS"
_CSRC = Path(__file__).parent / "csrc"
_SOURCES = ["attention.cpp", "layer_ops.cpp", "gemm.cpp", "qgemm.cpp", "decode_step.cpp", "decode_region.cpp"]  # one translation unit, in this order
_HEADERS = ["simd.h"]
_FUNCTIONS = ["decode_attention", "prefill_attention", "rms_norm", "add_rms_norm", "rope_write_kv", "silu_mul",
              "skinny_linear", "skinny_linear_supported", "split_linear",
              "qgemm_supported", "bf16_linear", "int8_linear", "int8_group_linear", "w8a16_linear", "fp8_linear", "fp8b_linear",
              "decode_step", "decode_region", "decode_region_supported", "decode_region_last"]

_lock = threading.Lock()
_state: dict[str, ModuleType | None] = {}


def disabled() -> bool:
    return os.environ.get(DISABLE_ENV, "").strip().lower() not in ("", "0", "false", "no")


_AVX512 = {"avx512f": "-mavx512f", "avx512bw": "-mavx512bw", "avx512vl": "-mavx512vl",
           "avx512_vnni": "-mavx512vnni", "avx512_bf16": "-mavx512bf16"}


def cpu_flags() -> list[str]:
    """Compiler flags for this CPU: -mavx2 -mfma where /proc/cpuinfo lists both, and the
    AVX-512 set of the quantized GEMMs (F, BW, VL, VNNI, BF16) where it lists all of those."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = set(next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []))
    out = ["-mavx2", "-mfma"] if {"avx2", "fma"} <= flags else []
    if out and set(_AVX512) <= flags:
        out += list(_AVX512.values())
    return out


def _bindings() -> str:
    """The module's bindings. Every kernel releases the GIL while it runs (its arguments are
    converted before, its result after): a node's engine thread spends most of a step inside
    them, and holding the GIL there stalled the node's other threads (gRPC streams sending
    tokens, KV transfers) for a whole decode step (`decode_step`, ~50 ms at batch 4 in fp32),
    which delivered tokens a step late. The kernels touch no Python object."""
    defs = "".join(f'  m.def("{f}", &{f}, pybind11::call_guard<pybind11::gil_scoped_release>());\n'
                   for f in _FUNCTIONS)
    return f"PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {{\n{defs}}}\n"


def _build() -> ModuleType:
    from torch.utils.cpp_extension import load_inline

    sources = [*((_CSRC / f).read_text() for f in _SOURCES), _bindings()]
    headers = [(_CSRC / f).read_text() for f in _HEADERS]
    # -ffp-contract=off: no silent multiply-add fusion, so the fused ops round like torch's
    cflags = ["-O3", "-ffp-contract=off", "-fopenmp", *cpu_flags()]
    key = hashlib.sha256("\0".join([*sources, *headers, *cflags, torch.__version__]).encode()).hexdigest()[:12]
    build_dir = cache_root() / "torch_extensions" / f"halfmoon_cpu_{key}"
    build_dir.mkdir(parents=True, exist_ok=True)
    # torch's own build lock is a plain file: a process killed mid-build leaves it behind and
    # every later start waits on it forever. Serialize builds with flock instead (the kernel
    # drops it when its holder dies) and clear torch's file while holding ours.
    with open(build_dir / ".halfmoon-build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        (build_dir / "lock").unlink(missing_ok=True)
        return load_inline(name=f"halfmoon_cpu_{key}", cpp_sources=sources,
                           extra_cflags=cflags, extra_ldflags=["-fopenmp"], extra_include_paths=[str(_CSRC)],
                           build_directory=str(build_dir))


def kernels() -> ModuleType | None:
    """The compiled extension, or None when it is disabled or cannot be built."""
    if "mod" in _state:
        return _state["mod"]
    with _lock:
        if "mod" not in _state:
            mod = None
            if not disabled():
                try:
                    mod = _build()
                except Exception as e:  # no compiler, no ninja, a build error: fall back
                    log.warning("C++ CPU kernels unavailable, using the torch attention path "
                                "(%s: %s)", type(e).__name__, (str(e).strip().splitlines() or [""])[-1])
            _state["mod"] = mod
    return _state["mod"]


def reset() -> None:
    """Forget the loaded extension so the next `kernels()` looks again (for tests)."""
    with _lock:
        _state.clear()
