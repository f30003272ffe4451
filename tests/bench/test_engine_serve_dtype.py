"""bench.serve and bench.layouts take the nodes' model dtype (`--dtype`)."""
from __future__ import annotations

import json

import pytest

import bench.layouts
import bench.serve


def test_layouts_and_serve_start_their_nodes_in_the_dtype(monkeypatch):
    from cluster.local import LocalCluster

    built = []

    class Started:
        address = "x"

    def build(cls, p, d, *, conductor=None, node=None, colocated=0):
        built.append((p, d, colocated, node.dtype))
        return type("C", (), {"start": lambda self: Started()})()

    monkeypatch.setattr(LocalCluster, "build", classmethod(build))
    bench.layouts._start("1p1d", 1, "w8a8")
    bench.layouts._start("2co", 1, "fp8")
    bench.serve.start_cluster("bfloat16", 2, 1, 1)
    assert built == [(1, 1, 0, "w8a8"), (0, 0, 2, "fp8"), (2, 1, 0, "bfloat16")]


@pytest.mark.real_model
@pytest.mark.slow
def test_serve_with_a_dtype_runs_its_own_cluster(tmp_path):
    out = tmp_path / "serve.json"
    assert bench.serve.main(["--dtype", "w8a8", "--requests", "3", "--concurrency", "2", "--prompt-tokens", "48",
                             "--output-tokens", "5", "--json", str(out)]) == 0
    s = json.loads(out.read_text())["summary"]
    assert (s["dtype"], s["completed"], s["errors"]) == ("w8a8", 3, 0)
