"""The trace replayer's HTTP client (`--target http://...`) against the real HTTP frontend
on loopback, over an in-process fake backend: token-by-token timing, rejections and
failures with the server's reasons, and the `return_token_ids` extension it relies on."""
from __future__ import annotations

import json

import httpx
import pytest

from bench.replay import main
from conductor.frontend_api import Rejected

pytestmark = pytest.mark.timeout(60)


def test_return_token_ids_puts_every_token_in_the_stream(url, backend):
    body = {"prompt": [5, 6, 7], "max_tokens": 4, "ignore_eos": True, "stream": True, "return_token_ids": True}
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=10)
    chunks = [json.loads(e.removeprefix("data: ")) for e in r.text.split("\n\n") if e and e != "data: [DONE]"]
    assert [c["choices"][0]["token_ids"] for c in chunks] == [[0], [1], [2], [3], []]  # the last: finish reason
    plain = httpx.post(f"{url}/v1/completions", json={**body, "stream": False}, timeout=10).json()
    assert plain["choices"][0]["token_ids"] == [0, 1, 2, 3]
    without = httpx.post(f"{url}/v1/completions", json={**body, "return_token_ids": False}, timeout=10)
    assert "token_ids" not in without.text


def test_replay_over_http_times_every_token_and_accounts_for_every_request(url, backend, tmp_path):
    backend.token_delay_s = 0.01
    trace = tmp_path / "trace.jsonl"
    rows = [{"timestamp": ts, "input_length": 600, "output_length": 50, "hash_ids": [0, 1]} for ts in (0, 100, 200)]
    trace.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "http.json"
    rc = main(["--trace", str(trace), "--target", url, "--output-scale", "0.1", "--speedup", "1",
               "--ttft-slo", "5", "--tbt-slo", "1", "--json", str(out)])
    assert rc == 0
    run = json.loads(out.read_text())["runs"][0]
    assert [q["outcome"] for q in run["requests"]] == ["completed"] * 3
    assert [q["output_tokens"] for q in run["requests"]] == [5, 5, 5]  # 50 x 0.1
    assert [len(q["tbt_gaps_s"]) for q in run["requests"]] == [4, 4, 4]
    # tokens 10 ms apart are timed apart; the first request is not judged: client and server
    # share this process, and first-use imports on the client's side can delay its reads
    later = [g for q in run["requests"][1:] for g in q["tbt_gaps_s"]]
    assert min(later) >= 0.005, [q["tbt_gaps_s"] for q in run["requests"]]
    assert [len(r.prompt_token_ids) for r in backend.requests] == [19, 19, 19]  # 600 tokens -> 16-token blocks


def test_replay_over_http_reports_rejections_and_failures_with_reasons(url, backend, tmp_path):
    trace = tmp_path / "trace.jsonl"
    trace.write_text(json.dumps({"timestamp": 0, "input_length": 600, "output_length": 50, "hash_ids": [0, 1]}) + "\n")
    out = tmp_path / "r.json"
    backend.fail_next = Rejected("prefill_overloaded: predicted TTFT 9 s", 2.0)
    main(["--trace", str(trace), "--target", url, "--json", str(out)])
    (q,) = json.loads(out.read_text())["runs"][0]["requests"]
    assert q["outcome"] == "rejected" and "prefill_overloaded" in q["reason"]
    backend.fail_next, backend.fail_after_tokens = RuntimeError("decode node lost"), 2
    main(["--trace", str(trace), "--target", url, "--json", str(out)])
    (q,) = json.loads(out.read_text())["runs"][0]["requests"]
    assert q["outcome"] == "failed" and q["output_tokens"] == 2
