"""bench.peers without llama.cpp or a model: in-process fake servers speaking llama.cpp's
native streamed /completion and halfmoon's /v1/completions, the SLO rule, re-judging,
capacity, targets, the chat workload, the quality comparison and the TTFT parts."""
from __future__ import annotations

import asyncio
import json

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route

from bench.peers import judge, quality, report, workloads
from bench.peers.runner import MeteredClient, parse_histogram_sums, run_workload, ttft_parts
from bench.replay.http_client import HttpReplayClient
from conductor.http_server import HttpServer


def fake_app(dialect: str, ttft_s: float = 0.01, tbt_s: float = 0.002, slots: int = 64, eos_after: int | None = None):
    """A server that answers token i of a request with prompt[i % len(prompt)] + 1, one token
    per chunk; ``slots`` requests at a time (the rest wait, as in a busy server)."""
    sem = asyncio.Semaphore(slots)
    bodies: list[dict] = []
    served = {"n": 0}

    async def generate(request: Request):
        body = await request.json()
        bodies.append(body)
        n = body["n_predict"] if dialect == "llama.cpp" else body["max_tokens"]
        if not body["ignore_eos"] and eos_after is not None:
            n = min(n, eos_after)
        prompt = body["prompt"]

        async def stream():
            async with sem:
                await asyncio.sleep(ttft_s)
                for i in range(n):
                    tok = prompt[i % len(prompt)] + 1
                    if dialect == "llama.cpp":
                        yield f"data: {json.dumps({'tokens': [tok], 'content': 'x', 'stop': False})}\n\n"
                    else:
                        yield f"data: {json.dumps({'choices': [{'text': 'x', 'token_ids': [tok]}]})}\n\n"
                    await asyncio.sleep(tbt_s)
                served["n"] += 1
                if dialect == "llama.cpp":
                    yield f"data: {json.dumps({'tokens': [], 'content': '', 'stop': True})}\n\n"
                else:
                    yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    async def ok(request: Request):
        return JSONResponse({"status": "ok"})

    async def metrics(request: Request):
        k = served["n"]
        lines = [f"halfmoon:ttft_{p}_seconds_sum {k * v}\nhalfmoon:ttft_{p}_seconds_count {k}"
                 for p, v in (("queue", 0.1), ("prefill", 0.2), ("kv_transfer", 0.05), ("first_decode", 0.01))]
        lines.append(f"halfmoon:time_to_first_token_seconds_sum {k * 0.4}\nhalfmoon:time_to_first_token_seconds_count {k}")
        return PlainTextResponse("\n".join(lines) + "\n")

    path = "/completion" if dialect == "llama.cpp" else "/v1/completions"
    routes = [Route(path, generate, methods=["POST"]), Route("/health", ok), Route("/ready", ok),
              Route("/metrics", metrics)]
    return Starlette(routes=routes), bodies


@pytest.fixture
def serve():
    servers = []

    def start(app):
        s = HttpServer(app).start()
        servers.append(s)
        return f"127.0.0.1:{s.port}"

    yield start
    for s in servers:
        s.stop()


def test_llama_dialect_streams_exact_tokens_from_native_completion(serve):
    app, bodies = fake_app("llama.cpp")
    address = serve(app)

    async def go():
        c = HttpReplayClient(address, dialect="llama.cpp")
        try:
            await c.check()
            return [t async for e in c.generate("r1", [10, 20, 30], 5) for t in e.token_ids]
        finally:
            await c.close()

    assert asyncio.run(go()) == [11, 21, 31, 11, 21]
    assert bodies == [{"prompt": [10, 20, 30], "n_predict": 5, "temperature": 0.0, "ignore_eos": True,
                       "stream": True, "return_tokens": True, "cache_prompt": True}]


def test_unknown_dialect_is_refused():
    with pytest.raises(ValueError, match="dialect"):
        HttpReplayClient("127.0.0.1:1", dialect="vllm")


def test_runner_sweeps_a_fake_llama_server_and_a_fake_halfmoon_with_the_same_prompts(serve, tmp_path):
    spec = workloads.chat(6, tmp_path, seed=3)
    results = {}
    for dialect in ("llama.cpp", "halfmoon"):
        app, bodies = fake_app(dialect)
        address = serve(app)

        async def go():
            inner = HttpReplayClient(address, dialect=dialect)
            client = MeteredClient(inner, address) if dialect == "halfmoon" else inner
            try:
                return await run_workload(client, spec, dialect, (4.0, 8.0), request_timeout_s=10, cooldown_s=0)
            finally:
                await inner.close()

        wr = asyncio.run(go())
        results[dialect] = (wr, [b["prompt"] for b in bodies])
    for dialect, (wr, prompts) in results.items():
        assert [r.summary.request_rate for r in wr.sweep.runs] == pytest.approx([4.0, 8.0])
        assert [r.summary.completed for r in wr.sweep.runs] == [6, 6]
        assert all(m.output_tokens == 32 for r in wr.sweep.runs for m in r.requests)
        assert wr.unloaded.ttft_s > 0.009 and wr.unloaded.tbt_s > 0.0015
    # 4 unloaded requests (one warm-up) and then 2 x 6 replayed: the same prompts to both systems
    assert results["llama.cpp"][1][4:] == results["halfmoon"][1][4:]
    assert len(results["halfmoon"][1]) == 16
    # halfmoon's TTFT parts per run, from /metrics scraped around it (served counts 4+6 then 4+12)
    parts = results["halfmoon"][0].ttft_parts
    assert len(parts) == 2
    assert parts[0] == pytest.approx({"queue": 0.1, "prefill": 0.2, "kv_transfer": 0.05, "first_decode": 0.01,
                                      "ttft": 0.4})
    assert results["llama.cpp"][0].ttft_parts == []


def test_slo_rule_takes_the_slowest_systems_unloaded_latencies():
    slo = judge.slo_rule([judge.Unloaded(0.2, 0.01), judge.Unloaded(0.5, 0.004)], ttft_x=5, tbt_x=3)
    assert slo.ttft_s == pytest.approx(2.5)
    assert slo.tbt_s == pytest.approx(0.03)
    with pytest.raises(ValueError):
        judge.slo_rule([])


def test_rejudged_rows_and_capacity(serve, tmp_path):
    # one slot: at 32 req/s the ~0.13-s requests queue and TTFTs grow past 0.6 s; at 2 req/s they do not
    app, _ = fake_app("llama.cpp", ttft_s=0.1, tbt_s=0.001, slots=1)
    address = serve(app)
    spec = workloads.chat(8, tmp_path)

    async def go():
        c = HttpReplayClient(address, dialect="llama.cpp")
        try:
            return await run_workload(c, spec, "peer", (2.0, 32.0), request_timeout_s=20, cooldown_s=0.5)
        finally:
            await c.close()

    wr = asyncio.run(go())
    slo = judge.SLO(0.6, 1.0)
    rows = [judge.row("peer", "chat", run, slo) for run in wr.sweep.runs]
    assert [r.requests for r in rows] == [8, 8]
    assert rows[0].slo_attainment == 1.0
    assert rows[1].slo_attainment < 0.9
    assert rows[0].goodput_rps == pytest.approx(rows[0].rate_rps)
    assert judge.capacity(rows).request_rate == pytest.approx(rows[0].rate_rps)
    cap = judge.capacity(rows).request_rate
    paths = report.draw({("peer", "chat"): (rows, wr.sweep)}, {"chat": slo}, {("peer", "chat"): cap},
                        tmp_path / "plots", "t")
    assert [p.name for p in paths] == ["t_goodput_chat.png", "t_cdf_chat.png"]
    assert all(p.stat().st_size > 1000 for p in paths)
    # a TBT SLO nothing meets: no capacity at all
    assert judge.capacity([judge.row("peer", "chat", run, judge.SLO(10.0, 1e-6)) for run in wr.sweep.runs]
                          ).request_rate is None


def _row(system, rate, att, tbt):
    return judge.Row(system, "chat", rate, 0.1, 0.2, tbt, 10.0, rate * att, att, 10, 10)


def test_capacity_is_the_highest_rate_meeting_90_percent():
    rows = [_row("a", 0.5, 1.0, 0.01), _row("a", 1.0, 0.9, 0.01), _row("a", 2.0, 0.5, 0.01)]
    assert judge.capacity(rows).request_rate == 1.0
    assert judge.capacity([_row("a", 0.5, 0.8, 0.01)]).request_rate is None


def test_targets_compare_capacity_and_p99_tbt_at_halfmoons_capacity_load():
    rows = [_row("llama-server", 1.0, 1.0, 0.02), _row("llama-server", 2.0, 0.5, 0.08),
            _row("halfmoon-1p1d", 1.0, 1.0, 0.03), _row("halfmoon-1p1d", 2.0, 0.95, 0.05)]
    caps = {("llama-server", "chat"): 1.0, ("halfmoon-1p1d", "chat"): 2.0}
    [t] = report.targets(rows, caps)
    assert t["capacity_ratio"] == 2.0 and t["capacity_target_met"] is True
    assert t["at_rate_rps"] == 2.0 and t["tbt_p99_s"] == 0.05 and t["peer_tbt_p99_s"] == 0.08
    assert t["tbt_target_met"] is True
    [t] = report.targets(rows, {("llama-server", "chat"): 2.0, ("halfmoon-1p1d", "chat"): 2.0})
    assert t["capacity_ratio"] == 1.0 and t["capacity_target_met"] is False

    import io

    from rich.console import Console

    doc = {"slo": {"chat": {"ttft_s": 1.0, "tbt_s": 0.1}}, "load_average": [1.5, 1.0, 1.0],
           "rows": [dict(zip(judge.Row.__slots__, (getattr(r, k) for k in judge.Row.__slots__))) for r in rows],
           "capacity": [{"system": s, "workload": w, "effective_capacity_rps": c} for (s, w), c in caps.items()],
           "quality": [{"system": "llama-server", "exact": 3, "prompts": 12, "mean_first_divergence": 14.1,
                        "first_answer": "L'Etoile"}],
           "ttft_breakdown": [{"system": "halfmoon-1p1d", "workload": "chat", "rate_rps": 2.0, "queue_s": 0.1,
                               "prefill_s": 0.2, "kv_transfer_s": 0.01, "first_decode_s": 0.02, "ttft_s": 0.33}],
           "targets": report.targets(rows, caps)}
    out = io.StringIO()
    report.print_table(Console(file=out, width=200), doc)
    text = out.getvalue()
    assert "capacity x2.00 llama-server's (target 1.5x: met); p99 TBT 50 ms vs 80 ms at 2.00 req/s (target <=: met)" in text
    assert "3/12" in text and "0.200 s" in text and "load average 1.5" in text


def test_chat_workload_shares_system_prompts_and_conversation_prefixes():
    shape = workloads.ChatShape()
    recs = workloads.chat_records(40, seed=5, shape=shape)
    assert len(recs) == 40
    assert recs == workloads.chat_records(40, seed=5, shape=shape)
    assert [r.timestamp_ms for r in recs] == sorted(r.timestamp_ms for r in recs)
    systems = {r.hash_ids[: shape.system_blocks] for r in recs}
    assert 1 < len(systems) <= shape.system_prompts
    assert all(r.input_length == len(r.hash_ids) * workloads.BLOCK and r.output_length == 32 for r in recs)
    # a later turn's prompt extends an earlier turn's prompt plus that turn's answer blocks
    longer = [r for r in recs if len(r.hash_ids) > shape.system_blocks + shape.user_blocks[1]]
    assert longer
    for r in longer:
        assert any(len(q.hash_ids) < len(r.hash_ids) and r.hash_ids[: len(q.hash_ids)] == q.hash_ids
                   for q in recs)


def test_quality_compare_counts_identical_answers_and_first_divergence():
    eos = {2}
    ref = [[5, 6, 7, 2], [1, 2], [9, 9, 9]]
    got = [[5, 6, 7], [1, 3], [9, 9]]
    c = quality.compare(got, ref, eos, decode=lambda ids: ",".join(map(str, ids)))
    assert (c.prompts, c.exact) == (3, 1)
    # [1] with EOS stripped is [1]: vs [1, 3] the prefix ends at 1; [9, 9] vs [9, 9, 9] at 2
    assert c.mean_first_divergence == pytest.approx((3 + 1 + 2) / 3)
    assert c.first_answer == "5,6,7"


def test_quality_answers_honour_eos_through_the_client(serve):
    app, bodies = fake_app("llama.cpp", eos_after=3)
    address = serve(app)

    async def go():
        c = HttpReplayClient(address, dialect="llama.cpp", ignore_eos=False)
        try:
            return await quality.answers(c, [[1, 2], [7]])
        finally:
            await c.close()

    assert asyncio.run(go()) == [[2, 3, 2], [8, 8, 8]]
    assert all(b["ignore_eos"] is False and b["n_predict"] == quality.MAX_TOKENS for b in bodies)


def test_ttft_parts_from_two_scrapes():
    before = parse_histogram_sums("# HELP x\nhalfmoon:ttft_queue_seconds_sum 1.0\n"
                                  "halfmoon:ttft_queue_seconds_count 2\nother{node=\"a\"}_sum 5\n")
    assert before == {"halfmoon:ttft_queue_seconds_sum": 1.0, "halfmoon:ttft_queue_seconds_count": 2.0}
    names = [f"halfmoon:ttft_{p}_seconds" for p in ("queue", "prefill", "kv_transfer", "first_decode")]
    names.append("halfmoon:time_to_first_token_seconds")
    a = {f"{n}_{k}": 0.0 for n in names for k in ("sum", "count")}
    b = {f"{n}_sum": 0.5 * (i + 1) for i, n in enumerate(names)} | {f"{n}_count": 5.0 for n in names}
    assert ttft_parts(a, b) == pytest.approx({"queue": 0.1, "prefill": 0.2, "kv_transfer": 0.3,
                                              "first_decode": 0.4, "ttft": 0.5})
    assert ttft_parts(a, a) is None


def test_cli_refuses_an_unknown_system():
    from bench.peers import main

    assert main(["--systems", "vllm", "--no-quality"]) == 2


def test_a_system_that_fails_to_start_is_skipped_and_named(monkeypatch, capsys, tmp_path):
    import contextlib

    from bench.peers import install, servers
    from bench.peers import main

    @contextlib.contextmanager
    def broken(system, dtype, threads):
        raise RuntimeError("conductor exited with code 1 during start-up")
        yield

    monkeypatch.setattr(servers, "halfmoon", broken)
    monkeypatch.setattr(install, "install_llama_server", lambda: install.Skipped("llama-server", "no cmake"))
    rc = main(["--systems", "llama-server,halfmoon-1p1d", "--no-quality", "--workloads", "chat",
               "--log-dir", str(tmp_path), "--json", str(tmp_path / "p.json")])
    out = capsys.readouterr().out.replace("\n", " ")
    assert rc == 2
    assert "skipping llama-server: no cmake" in out
    assert "halfmoon-1p1d failed (RuntimeError: conductor exited with code 1 during start-up); going on" in out
