"""`python -m bench.transfer` runs end to end and writes the rows the issue asks for."""

from __future__ import annotations

import json

from bench import transfer as bench


def test_quick_bench_writes_rows_and_ratios(tmp_path, capsys):
    out = tmp_path / "transfer.json"
    argv = ["--quick", "--json", str(out), "--transports", "tcp,raw_socket,shm,memcpy", "--modes", "serial",
            "--rounds", "1", "--min-time", "0.01"]

    assert bench.main(argv) == 0

    doc = json.loads(out.read_text())
    rows = doc["rows"]
    assert {r["transport"] for r in rows} == {"tcp", "raw_socket", "shm", "memcpy"}
    assert {r["size_bytes"] for r in rows if r["shape"] == "contiguous"} == set(bench.QUICK_SIZES)
    kv = [r for r in rows if r["shape"] == "kv_batch"]
    assert {r["entries"] for r in kv} == {bench.QUICK_KV_BLOCKS}
    assert all(r["gb_per_s"] > 0 for r in rows)
    assert {r["target"] for r in doc["ratios"]} == {"tcp vs raw socket, >= 1 MiB", "tcp vs raw socket, KV batch",
                                                     "shm vs memcpy"}
    assert "tcp/raw" in capsys.readouterr().out
