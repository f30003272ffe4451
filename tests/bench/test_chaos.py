"""The chaos suite's own logic: rows counted from outcomes, the table and JSON, the block
audit, the load's loop and its verdicts against in-process front doors over a fake
backend, the conductor-view watch, the scenario runner with fakes, the soak's figures;
and one slow end-to-end scenario (kill -9 of a decode node under load, tiny model)."""
from __future__ import annotations

import asyncio
import json
from dataclasses import replace

import grpc
import pytest

from bench.chaos.audit import audit_blocks, parse_gauge
from bench.chaos.cluster import RotationWatch, Sample, in_rotation, out_of_rotation
from bench.chaos.load import ClosedLoop, LoadClient, LoadPlan, classify_http_error, make_prompts
from bench.chaos.report import (Audit, Outcome, Row, error_key, names_exception_class, summarize, table,
                                 write_json)
from bench.chaos.scenarios import SCENARIOS, Options, Result, Scenario, SuiteState, run_scenario
from bench.chaos.soak import summarize as soak_summarize
from conductor.frontend_api import Finished, RequestFailed, TokenChunk, Unavailable, Usage

REQUIRED = {"scenario", "requests", "completed", "failed_clean", "hung", "leaked_blocks", "detect_s"}


def out(index, status, sent=0.0, error="", tokens=(1, 2), ttft=None, api="grpc"):
    return Outcome(index, api, sent, sent + 1, status, error, tokens, ttft)


# --- rows, table, JSON ----------------------------------------------------------------------

def test_summarize_counts_every_status_failures_after_the_fault_mismatches_and_folds_errors():
    outcomes = [
        out(0, "completed", 1.0, tokens=(5, 6)),
        out(1, "completed", 2.0, tokens=(7, 9)),  # differs from the reference (7, 8)
        out(2, "completed", 12.0, tokens=(1,)),  # index 2 has no reference answer
        out(3, "failed_clean", 5.0, "ABORTED: decode node decode-0 failed: UNAVAILABLE 123"),
        out(4, "failed_clean", 11.0, "ABORTED: decode node decode-0 failed: UNAVAILABLE 456"),
        out(5, "failed_unclean", 12.0, "INTERNAL: boom"),
        out(6, "hung", 13.0, "no end within 60s"),
    ]
    audit = Audit({"prefill-0": 0, "decode-1": 3}, None)
    row = summarize("kill-decode", outcomes, audit, fault_at=10.0, detect_s=0.4, recover_s=9.5,
                    reference={0: (5, 6), 1: (7, 8)}, notes="SIGKILL decode-0")
    assert (row.requests, row.completed, row.failed_clean, row.failed_unclean, row.hung) == (7, 3, 2, 1, 1)
    assert row.failed_after_fault == 3  # sent at 11, 12, 13: after the fault at 10
    assert row.mismatched == 1
    assert row.leaked_blocks == 3 and row.settle_s is None
    assert (row.detect_s, row.recover_s) == (0.4, 9.5)
    assert row.errors == {"failed_clean: ABORTED: decode node decode-# failed: UNAVAILABLE #": 2,
                          "failed_unclean: INTERNAL: boom": 1, "hung: no end within #s": 1}
    assert row.notes == "SIGKILL decode-0; decode-1 holds 3 blocks"
    assert not row.ok()


def test_a_clean_row_is_ok_and_an_unreachable_node_makes_leaks_unknown():
    clean = summarize("baseline", [out(0, "completed"), out(1, "failed_clean", error="rejected")],
                      Audit({"a": 0}, 1.5))
    assert clean.ok() and clean.leaked_blocks == 0 and clean.settle_s == 1.5 and clean.mismatched is None
    unknown = summarize("x", [out(0, "completed")], Audit({"a": 0}, None, unreachable=("b",)))
    assert unknown.leaked_blocks is None and not unknown.ok()
    assert "b /metrics unreachable" in unknown.notes
    assert summarize("y", [], None).leaked_blocks is None
    with pytest.raises(ValueError, match="status must be one of"):
        out(0, "exploded")


@pytest.mark.parametrize("message,named", [
    ("Exception deserializing request!", False), ("ABORTED: decode node decode-0 failed: UNAVAILABLE", False),
    ("ValueError: Exceeds the limit", True), ("internal error: RecursionError", True),
    ("decode node decode-1 failed: UNKNOWN: Unexpected <class 'TypeError'>: f() got an unexpected keyword", True),
    ("Traceback (most recent call last):", True)])
def test_messages_naming_an_exception_class_are_spotted(message, named):
    assert names_exception_class(message) is named


def test_error_key_folds_runs_of_digits():
    assert error_key("request 1a2b3c4d failed after 12.5s") == "request #a#b#c#d failed after #.#s"
    assert len(error_key("x" * 500)) == 120


def test_table_and_json_rows(tmp_path):
    rows = [Row("baseline", 40, 40, 0, 0, 0, None),
            Row("kill-decode", 52, 50, 2, 0, 0, 0.31, recover_s=12.25, errors={"failed_clean: ABORTED: x": 2},
                notes="SIGKILL decode-0")]
    text = table(rows)
    lines = text.splitlines()
    assert lines[0].split() == ["scenario", "requests", "completed", "failed_clean", "failed_unclean", "hung",
                                "failed_after_fault", "mismatched", "leaked_blocks", "detect_s", "recover_s"]
    assert lines[2].split() == ["baseline", "40", "40", "0", "0", "0", "0", "-", "0", "-", "-"]
    assert lines[3].split() == ["kill-decode", "52", "50", "2", "0", "0", "0", "-", "0", "0.31", "12.25"]
    assert "  kill-decode: 2 x failed_clean: ABORTED: x" in lines
    assert "  kill-decode: SIGKILL decode-0" in lines
    path = tmp_path / "out" / "chaos.json"
    write_json(rows, path, {"command": "python -m bench.chaos"})
    doc = json.loads(path.read_text())
    assert doc["command"] == "python -m bench.chaos"
    assert [r["scenario"] for r in doc["rows"]] == ["baseline", "kill-decode"]
    for r in doc["rows"]:
        assert REQUIRED <= set(r)
    assert doc["rows"][1]["detect_s"] == 0.31 and doc["rows"][0]["leaked_blocks"] == 0


# --- the block audit ---------------------------------------------------------------------------

METRICS = """# HELP halfmoon:kv_blocks_used KV blocks held by requests (or reserved for them).
# TYPE halfmoon:kv_blocks_used gauge
halfmoon:kv_blocks_used{node="decode-0",role="decode"} 7.0
halfmoon:kv_blocks_used_other{node="decode-0",role="decode"} 99.0
halfmoon:kv_blocks_free{node="decode-0",role="decode"} 505.0
"""


def test_parse_gauge_reads_one_metric_by_node():
    assert parse_gauge(METRICS, "halfmoon:kv_blocks_used") == {"decode-0": 7.0}
    assert parse_gauge(METRICS, "halfmoon:kv_blocks_free") == {"decode-0": 505.0}
    assert parse_gauge(METRICS, "halfmoon:nothing") == {}


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t

    def sleep(self, s):
        self.t += s


def test_audit_waits_for_blocks_to_come_back_and_reports_what_stays():
    readings = {"a": [3, 1, 0, 0, 0], "b": [2, 0, 0, 0, 0]}
    clock = FakeClock()

    def scrape(addr):
        return readings[addr].pop(0)

    got = audit_blocks({"prefill-0": "a", "decode-0": "b"}, grace_s=10, every_s=0.5, scrape=scrape, clock=clock,
                       sleep=clock.sleep)
    assert got.used == {"prefill-0": 0, "decode-0": 0} and got.leaked == 0 and got.settle_s == 1.0

    clock = FakeClock()
    stuck = audit_blocks({"decode-1": "x"}, grace_s=2, every_s=0.5, scrape=lambda a: 4, clock=clock,
                         sleep=clock.sleep)
    assert stuck.used == {"decode-1": 4} and stuck.leaked == 4 and stuck.settle_s is None

    def down(addr):
        raise OSError("connection refused")

    clock = FakeClock()
    gone = audit_blocks({"decode-1": "x"}, grace_s=1, every_s=0.5, scrape=down, clock=clock, sleep=clock.sleep)
    assert gone.unreachable == ("decode-1",) and gone.used == {}


# --- the load ------------------------------------------------------------------------------------

def test_prompts_are_seeded_and_within_the_lengths():
    plan = LoadPlan(requests=10, min_prompt_tokens=5, max_prompt_tokens=9, seed=3)
    a, b = make_prompts(10, plan), make_prompts(10, plan)
    assert a == b and len(set(a)) == 10
    assert all(5 <= len(p) <= 9 and all(100 <= t < 40000 for t in p) for p in a)
    assert make_prompts(10, replace(plan, seed=4)) != a
    with pytest.raises(ValueError, match="api must be one of"):
        LoadPlan(api="carrier-pigeon")


def test_classify_http_error():
    body = lambda code: json.dumps({"error": {"message": "m", "type": "t", "param": None, "code": code}}).encode()
    assert classify_http_error(429, body("rate_limit_exceeded")) == ("failed_clean", "HTTP 429: m")
    assert classify_http_error(500, body("request_failed")) == ("failed_clean", "HTTP 500: m")
    assert classify_http_error(503, body("unavailable")) == ("failed_clean", "HTTP 503: m")
    assert classify_http_error(500, body("internal_error")) == ("failed_unclean", "HTTP 500: m")
    assert classify_http_error(502, b"<html>bad gateway</html>") == ("failed_unclean", "HTTP 502: <html>bad gateway</html>")


class FakeLoadClient:
    def __init__(self, fail=()):
        self.calls: list[tuple[int, str]] = []
        self.in_flight = 0
        self.most = 0
        self.fail = set(fail)

    async def one(self, index, prompt, max_tokens, api):
        self.calls.append((index, api))
        self.in_flight += 1
        self.most = max(self.most, self.in_flight)
        await asyncio.sleep(0.01)
        self.in_flight -= 1
        n = len(self.calls) - 1
        status = "failed_clean" if n in self.fail else "completed"
        return Outcome(index, api, float(n), float(n), status, "x" if status != "completed" else "", (index,))


def test_closed_loop_bounds_concurrency_cycles_prompts_and_alternates_apis():
    plan = LoadPlan(requests=10, concurrency=3, api="mixed")
    client = FakeLoadClient()
    outcomes = asyncio.run(ClosedLoop(client, plan, [(1,), (2,), (3,), (4,)]).run())
    assert len(outcomes) == 10 and client.most == 3
    assert [o.index for o in outcomes] == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]  # prompt n mod 4
    assert [o.api for o in outcomes] == ["grpc", "http"] * 5  # API by request number


def test_closed_loop_stops_on_the_event_and_backs_off_after_failures():
    async def go():
        client = FakeLoadClient(fail=range(1000))
        stop = asyncio.Event()
        loop = ClosedLoop(client, LoadPlan(concurrency=2, api="grpc"), [(1,)], count=10**9, backoff_s=0.2)
        task = asyncio.ensure_future(loop.run(stop))
        await loop.wait_sent(2)
        await asyncio.sleep(0.5)
        stop.set()
        return await task

    outcomes = asyncio.run(go())
    assert 4 <= len(outcomes) <= 8  # two workers, each pausing 0.2 s after every failure, for ~0.5 s


class FakeBackend:
    """Answers by the first prompt token: 1 completes, 2 fails named, 3 unavailable, 4 raises
    something unexpected, 5 never answers, 6 fails naming an exception class."""

    model_name = "fake-model"

    async def generate(self, request):
        first = request.prompt_token_ids[0]
        if first == 1:
            yield TokenChunk("a", (11,))
            yield TokenChunk("b", (12,))
            yield Finished("length", Usage(1, 2))
        elif first == 2:
            raise RequestFailed("decode node decode-0 failed")
        elif first == 3:
            raise Unavailable("no live decode node")
        elif first == 4:
            raise ZeroDivisionError("oops")
        elif first == 6:
            raise RequestFailed("decode node decode-0 failed: UNKNOWN: Unexpected <class 'TypeError'>: boom")
        else:
            await asyncio.sleep(3600)
            yield TokenChunk("", ())


async def _serve_fake():
    from prometheus_client import CollectorRegistry

    from cluster.specs import free_port
    from conductor.grpc_api import GenerationService
    from conductor.http_frontend import build_app
    from conductor.http_server import HttpServer
    from proto.halfmoon.v1 import generate_pb2_grpc

    backend = FakeBackend()
    server = grpc.aio.server()
    generate_pb2_grpc.add_GenerationServicer_to_server(GenerationService(backend), server)
    gport = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    hport = free_port()
    http = HttpServer(build_app(backend, CollectorRegistry()), "127.0.0.1", hport)
    task = asyncio.ensure_future(http.serve())
    for _ in range(100):
        try:
            await asyncio.open_connection("127.0.0.1", hport)
            break
        except OSError:
            await asyncio.sleep(0.05)
    return server, http, task, f"127.0.0.1:{gport}", f"127.0.0.1:{hport}"


@pytest.mark.parametrize("api", ["grpc", "http"])
def test_load_client_verdicts_against_real_front_doors_over_a_fake_backend(api):
    async def go():
        server, http, task, gaddr, haddr = await _serve_fake()
        client = LoadClient(gaddr, haddr, timeout_s=1.0)
        try:
            return [await client.one(k, (k, 7, 7), 2, api) for k in (1, 2, 3, 4, 5, 6)]
        finally:
            await client.close()
            await http.shutdown()
            task.cancel()
            await server.stop(0)

    done, failed, unavailable, unexpected, silent, leaky = asyncio.run(go())
    assert done.status == "completed" and done.tokens == (11, 12) and done.ttft_s is not None
    assert failed.status == "failed_clean" and "decode node decode-0 failed" in failed.error
    assert unavailable.status == "failed_clean" and "no live decode node" in unavailable.error
    assert unexpected.status == "failed_unclean"  # gRPC UNKNOWN / HTTP 500 internal_error
    assert silent.status == "hung" and silent.error == "no end within 1s (0 tokens so far)"
    assert silent.ended_s - silent.sent_s < 5
    assert leaky.status == "failed_unclean" and "<class 'TypeError'>" in leaky.error  # ABORTED / 500 around a bug


# --- the conductor's view over time -----------------------------------------------------------------

def test_rotation_watch_finds_when_a_node_left_and_came_back():
    w = RotationWatch("unused:0")
    w.samples = [Sample(1.0, {"d0": "up", "d1": "up"}), Sample(2.0, None), Sample(3.0, {"d0": "down", "d1": "up"}),
                 Sample(4.0, {"d1": "up"}), Sample(5.0, {"d0": "up", "d1": "up"})]
    assert w.first(1.5, out_of_rotation("d0")) == 3.0  # an unreachable conductor says nothing
    assert w.first(3.5, in_rotation("d0")) == 5.0
    assert w.first(0.0, in_rotation("d0", "d1")) == 1.0
    assert w.first(5.5, in_rotation("d0")) is None
    assert asyncio.run(w.wait(1.5, out_of_rotation("d0"), 1.0)) == 1.5
    assert asyncio.run(w.wait(5.5, out_of_rotation("d0"), 0.1)) is None


# --- the scenario runner, with fakes ----------------------------------------------------------------

class FakeCluster:
    def __init__(self, plan):
        self.plan = plan
        self.metrics = {"prefill-0": "p0", "decode-0": "d0", "decode-1": "d1"}
        self.stopped = False

    def start(self):
        return self

    def stop(self):
        self.stopped = True

    def refresh_metrics(self):
        self.metrics["decode-1"] = "d1-new"


def test_run_scenario_sets_the_reference_audits_survivors_only_and_reports_harness_errors():
    made: list[FakeCluster] = []

    def make(plan):
        made.append(FakeCluster(plan))
        return made[-1]

    audited: list[dict] = []

    def audit(nodes, grace):
        audited.append(dict(nodes))
        return Audit({n: 0 for n in nodes}, 0.5)

    async def base(cluster, opts, state):
        return Result([out(0, "completed", tokens=(1, 2)), out(1, "completed", tokens=(3, 4))])

    async def faulty(cluster, opts, state):
        return Result([out(0, "completed", 5.0, tokens=(1, 2)), out(1, "completed", 6.0, tokens=(3, 5)),
                       out(0, "failed_clean", 7.0, "ABORTED")], fault_at=4.0, detect_s=0.2, lost=("decode-0",),
                      extra={"fuzz": {"inputs": 3}})

    async def broken(cluster, opts, state):
        raise RuntimeError("the harness tripped")

    state = SuiteState([(1,), (2,)])
    opts = Options()
    logs: list[str] = []
    row = run_scenario(Scenario("baseline", base), opts, state, logs.append, make_cluster=make, audit=audit)
    assert row.ok() and state.reference == {0: (1, 2), 1: (3, 4)} and made[-1].stopped
    row = run_scenario(Scenario("kill-decode", faulty), opts, state, logs.append, make_cluster=make, audit=audit)
    assert audited[-1] == {"prefill-0": "p0", "decode-1": "d1-new"}  # the lost node is not audited
    assert (row.requests, row.completed, row.failed_clean, row.failed_after_fault, row.mismatched) == (3, 2, 1, 1, 1)
    assert row.detect_s == 0.2 and row.leaked_blocks == 0 and row.details == {"fuzz": {"inputs": 3}}
    row = run_scenario(Scenario("x", broken), opts, state, logs.append, make_cluster=make, audit=audit)
    assert row.notes == "harness error: RuntimeError: the harness tripped" and made[-1].stopped and not row.ok()


def test_scenario_plans_inject_faults_only_where_asked():
    from transfer_engine.faults import ENV_VAR

    opts = Options()
    assert SCENARIOS["transfer-fail"].plan(opts).env == {ENV_VAR: "fail=0.1,seed=7"}
    assert SCENARIOS["transfer-delay"].plan(opts).env == {ENV_VAR: "delay=0.1:0.2,seed=7"}
    assert SCENARIOS["kill-decode"].plan(opts).env == {}
    assert SCENARIOS["overload-3x"].plan(opts).settings == {"ttft_slo_s": 15.0, "tbt_slo_s": 1.0}
    assert SCENARIOS["baseline"].plan(opts).settings == {"ttft_slo_s": 600.0, "tbt_slo_s": 60.0}
    assert list(SCENARIOS) == ["baseline", "kill-decode", "kill-prefill", "kill-conductor", "stop-decode",
                               "stop-prefill", "stop-conductor", "transfer-fail", "transfer-delay", "overload-3x",
                               "fuzz"]


def test_cli_refuses_an_unknown_scenario(capsys):
    from bench.chaos import main

    assert main(["--scenarios", "baseline,meteor-strike"]) == 2
    assert "unknown scenario(s) meteor-strike" in capsys.readouterr().err


# --- the soak's figures -------------------------------------------------------------------------

def test_soak_summary_windows_rss_growth_and_ttft_drift():
    outcomes = [out(k, "completed", sent=100.0 + k, ttft=1.0 + (k >= 90) * 0.5) for k in range(120)]
    outcomes.append(out(200, "hung", sent=150.0, error="no end within 300s"))
    rss = {"conductor": [(100.0, 100), (130.0, 200), (220.0, 206)],
           "decode-0": [(100.0, 500), (131.0, 1000), (220.0, 1100)]}
    res = soak_summarize(outcomes, 100.0, 120.0, rss, Audit({"decode-0": 0}, 0.5), 1.0)
    assert res.window_s == 30.0  # a quarter of a short run
    assert res.rss_start == {"conductor": 200, "decode-0": 1000} and res.rss_end == {"conductor": 206,
                                                                                      "decode-0": 1100}
    assert res.rss_growth == pytest.approx({"conductor": 0.03, "decode-0": 0.10})
    assert res.ttft_p99_first_s == pytest.approx(1.0) and res.ttft_p99_last_s == pytest.approx(1.5)
    assert res.ttft_drift == pytest.approx(0.5)
    assert (res.requests, res.completed, res.hung, res.leaked_blocks) == (121, 120, 1, 0)
    assert res.verdicts() == {"rss_growth_below_5pct": False, "no_leaked_blocks": True,
                              "ttft_p99_within_20pct": False, "nothing_failed_or_hung": False}


# --- end to end ------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.timeout(240)
def test_kill_minus_nine_of_a_decode_node_under_load(tiny_model_dir):
    """Baseline, then SIGKILL of decode-0 under load on the tiny model: no hang, no unclean
    failure, no request sent after the kill fails, answers equal the baseline's, the node
    leaves rotation within 5 s and rejoins once respawned, and no survivor holds a block."""
    from bench.chaos.cluster import ClusterPlan

    opts = Options(cluster=ClusterPlan(prefill=1, decode=2, model=str(tiny_model_dir), num_blocks=256),
                   load=LoadPlan(requests=16, concurrency=4, max_tokens=16, timeout_s=30.0), tail_s=4.0,
                   audit_grace_s=15.0, recover_timeout_s=90.0)
    from bench.chaos.scenarios import new_state

    state = new_state(opts)
    base = run_scenario(SCENARIOS["baseline"], opts, state)
    assert base.completed == 16 and base.ok(), base
    row = run_scenario(SCENARIOS["kill-decode"], opts, state)
    assert row.hung == 0 and row.failed_unclean == 0, row.errors
    assert row.failed_after_fault == 0, row.errors
    assert row.mismatched == 0
    assert row.detect_s is not None and row.detect_s < 5.0
    assert row.recover_s is not None
    assert row.leaked_blocks == 0, row.notes
    assert row.requests > 16
