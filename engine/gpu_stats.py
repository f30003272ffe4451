"""A GPU's memory and utilization through NVML (`nvidia-ml-py`, imported as `pynvml`), for
nodes' heartbeats and `halfmoon status`.

`read(index)` returns None where there is nothing to report: pynvml not installed, no NVIDIA
driver (NVML fails to initialize, as on every CPU-only machine), or no such device. NVML is
initialized once per process, on the first call."""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

log = logging.getLogger(__name__)

_lock = threading.Lock()
_nvml = None  # the pynvml module once initialized; False when it cannot be


@dataclass(frozen=True, slots=True)
class GPUStats:
    index: int
    name: str
    memory_used_bytes: int
    memory_total_bytes: int
    utilization_pct: float  # share of the last sample period some kernel ran (NVML's "gpu" rate)


def _init():
    global _nvml
    with _lock:
        if _nvml is None:
            try:
                import pynvml

                pynvml.nvmlInit()
                _nvml = pynvml
            except Exception as e:  # ImportError, NVMLError (no driver / library): nothing to report
                log.debug("no GPU stats: %s: %s", type(e).__name__, e)
                _nvml = False
    return _nvml or None


def read(index: int = 0) -> GPUStats | None:
    """Memory used / total and utilization of GPU `index` (NVML's numbering), or None."""
    nvml = _init()
    if nvml is None:
        return None
    try:
        h = nvml.nvmlDeviceGetHandleByIndex(index)
        mem = nvml.nvmlDeviceGetMemoryInfo(h)
        util = nvml.nvmlDeviceGetUtilizationRates(h)
        name = nvml.nvmlDeviceGetName(h)
    except Exception as e:  # NVMLError: no such device, lost GPU
        log.debug("no GPU stats for device %d: %s", index, e)
        return None
    return GPUStats(index, name.decode() if isinstance(name, bytes) else str(name), int(mem.used), int(mem.total),
                    float(util.gpu))


def device_index(device) -> int | None:
    """The NVML index of a torch device that is a CUDA GPU (its CUDA index: NVML and CUDA agree
    when CUDA_DEVICE_ORDER=PCI_BUS_ID or on single-GPU machines), else None."""
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return None
    return device.index if device.index is not None else torch.cuda.current_device()


def reset() -> None:
    """Forget NVML's state so the next `read` initializes again (for tests)."""
    global _nvml
    with _lock:
        _nvml = None
