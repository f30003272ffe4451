"""GPU stats through NVML with a fake `pynvml` (no GPU here): what the engine reads, what the
conductor's Status passes on from a heartbeat, and what `halfmoon status` shows."""
from __future__ import annotations

import asyncio
import sys
import time
import types
from types import SimpleNamespace

import pytest
import torch

from cluster.status import GPURow, from_proto, tables
from engine import gpu_stats
from proto.halfmoon.v1 import admin_pb2, common_pb2, node_pb2


class NVMLError(Exception):
    pass


def fake_nvml(devices: dict[int, tuple[str, int, int, int]], init_fails: bool = False) -> types.ModuleType:
    """A pynvml with `devices`: index -> (name, used bytes, total bytes, utilization %)."""
    m = types.ModuleType("pynvml")
    m.inits = 0

    def init():
        m.inits += 1
        if init_fails:
            raise NVMLError("NVML Shared Library Not Found")

    def handle(i):
        if i not in devices:
            raise NVMLError("Invalid Argument")
        return i

    m.nvmlInit = init
    m.nvmlDeviceGetHandleByIndex = handle
    m.nvmlDeviceGetMemoryInfo = lambda h: SimpleNamespace(used=devices[h][1], total=devices[h][2], free=0)
    m.nvmlDeviceGetUtilizationRates = lambda h: SimpleNamespace(gpu=devices[h][3], memory=0)
    m.nvmlDeviceGetName = lambda h: devices[h][0].encode()  # older bindings return bytes
    return m


@pytest.fixture
def nvml(monkeypatch):
    def install(module):
        if module is None:
            monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails
        else:
            monkeypatch.setitem(sys.modules, "pynvml", module)
        gpu_stats.reset()
        return module

    yield install
    gpu_stats.reset()


def test_read_reports_memory_and_utilization_of_the_device(nvml):
    m = nvml(fake_nvml({0: ("NVIDIA H200", 3 * 2**30, 141 * 2**30, 37), 1: ("NVIDIA H200", 5, 10, 0)}))
    assert gpu_stats.read(0) == gpu_stats.GPUStats(0, "NVIDIA H200", 3 * 2**30, 141 * 2**30, 37.0)
    assert gpu_stats.read(1).memory_used_bytes == 5
    assert gpu_stats.read(2) is None  # no such device
    assert m.inits == 1  # initialized once


def test_read_is_none_without_pynvml_or_without_a_driver(nvml):
    nvml(None)
    assert gpu_stats.read(0) is None
    m = nvml(fake_nvml({0: ("x", 1, 2, 3)}, init_fails=True))
    assert gpu_stats.read(0) is None and gpu_stats.read(0) is None
    assert m.inits == 1  # a failed init is not retried every heartbeat


def test_device_index_is_none_on_cpu():
    assert gpu_stats.device_index(torch.device("cpu")) is None
    assert gpu_stats.device_index("cuda:1") == 1


def _status_with(gpu: common_pb2.GPUUse | None):
    from conductor.grpc_api import AdminService

    load = node_pb2.NodeLoad(running=1, free_blocks=10)
    if gpu is not None:
        load.gpu.CopyFrom(gpu)
    rec = SimpleNamespace(node_id="decode-0", role="decode", address="127.0.0.1:1", up=True, load=load,
                          layout=node_pb2.KVLayout(total_blocks=16), last_seen=time.monotonic(), metrics_address="")
    admin = AdminService(SimpleNamespace(describe=lambda: []), SimpleNamespace(nodes={"decode-0": rec}), "m")
    return asyncio.run(admin.Status(admin_pb2.StatusRequest(), None))


def test_heartbeat_gpu_reaches_status_json_and_table():
    st = _status_with(common_pb2.GPUUse(index=0, name="NVIDIA H200", memory_used_bytes=3 * 2**30,
                                        memory_total_bytes=141 * 2**30, utilization_pct=37.0))
    status = from_proto("c", st)
    assert status.nodes[0].gpu == GPURow(0, "NVIDIA H200", 3 * 2**30, 141 * 2**30, 37.0)
    assert status.to_json()["nodes"][0]["gpu"] == {"index": 0, "name": "NVIDIA H200", "memory_used_bytes": 3 * 2**30,
                                                   "memory_total_bytes": 141 * 2**30, "utilization_pct": 37.0}
    nodes = tables(status)[0]
    cols = {c.header: list(c.cells) for c in nodes.columns}
    assert cols["GPU memory"] == ["3.0/141.0 GiB"] and cols["GPU util"] == ["37%"]


def test_cpu_nodes_show_no_gpu():
    status = from_proto("c", _status_with(None))
    assert status.nodes[0].gpu is None and "gpu" not in status.to_json()["nodes"][0]
    assert "GPU memory" not in [c.header for c in tables(status)[0].columns]
