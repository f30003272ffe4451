"""The benchmark programs answer bad flags with one line and exit 2: argparse names the
flag for a number out of range (a load of 0 divided by zero, a NaN period never ended, a
negative seed reached NumPy), and what a run refuses (a setting the conductor rejects, an
unknown policy, an unwritable file) is printed without a traceback."""
from __future__ import annotations

import argparse
import importlib

import pytest

from bench import flags

# (module, arguments, what the message names); each exits before any long work
ARGPARSE_ERRORS = [
    ("bench.sim.scale", ["--load", "0"], "--load"),
    ("bench.sim.scale", ["--load", "nan"], "--load"),
    ("bench.sim.scale", ["--load", "-1"], "--load"),
    ("bench.sim.scale", ["--seed", "-1"], "--seed"),
    ("bench.sim.scale", ["--cache-blocks", "-5"], "--cache-blocks"),
    ("bench.sim.scale", ["--nodes", "1"], "--nodes"),
    ("bench.sim.compare", ["policies", "--loads", "0"], "--loads"),
    ("bench.sim.compare", ["policies", "--loads", "1,inf"], "--loads"),
    ("bench.sim.compare", ["policies", "--workloads", "uniform,nope"], "--workloads"),
    ("bench.sim.compare", ["admission", "--prefill", "0"], "--prefill"),
    ("bench.sim.compare", ["admission", "--sample", "0"], "--sample"),
    ("bench.sim.compare", ["policies", "--decode-threshold", "nan"], "--decode-threshold"),
    ("bench.sim.elastic", ["--period", "nan"], "--period"),
    ("bench.sim.elastic", ["--period", "0"], "--period"),
    ("bench.sim.elastic", ["--nodes", "0"], "--nodes"),
    ("bench.sim.elastic", ["--splits", "x"], "--splits"),
    ("bench.sim.elastic", ["--load", "0"], "--load"),
    ("bench.sim.threshold", ["--thresholds", "inf"], "--thresholds"),
    ("bench.sim.threshold", ["--loads", ","], "--loads"),
    ("bench.sim.threshold", ["--seed", "-1"], "--seed"),
    ("bench.sim.tiers", ["--speedup", "0"], "--speedup"),
    ("bench.sim.tiers", ["--device-blocks", "-1"], "--device-blocks"),
    ("bench.sim.workloads", ["uniform", "--seed", "-1", "--out", "x.jsonl"], "--seed"),
    ("bench.conductor_decision", ["--nodes", "0", "--blocks", "10"], "--nodes"),
    ("bench.conductor_decision", ["--nodes", "4", "--blocks", "-1"], "--blocks"),
    ("bench.conductor_decision", ["--decisions", "0"], "--decisions"),
    # the trace replay (was: a traceback from inside the sweep, or a replay that never ended)
    ("bench.replay.cli", ["--trace", "t.jsonl", "--output-scale", "nan"], "--output-scale"),
    ("bench.replay.cli", ["--trace", "t.jsonl", "--request-timeout", "0"], "--request-timeout"),
    ("bench.replay.cli", ["--trace", "t.jsonl", "--seed", "-1"], "--seed"),
    ("bench.replay.cli", ["--trace", "t.jsonl", "--fake-ttft-base", "nan"], "--fake-ttft-base"),
    ("bench.replay.cli", ["--trace", "t.jsonl", "--fake-tbt", "inf"], "--fake-tbt"),
    ("bench.replay.cli", ["--trace", "t.jsonl", "--speedup", "0"], "--speedup"),
    ("bench.replay.cli", ["--trace", "t.jsonl", "--capacity-threshold", "0"], "--capacity-threshold"),
    ("bench.replay.cli", ["--trace", "t.jsonl", "--speedups", "1,nan"], "--speedups"),  # nan was a run
    ("bench.replay.cli", ["--trace", "t.jsonl", "--rates", "0.5,inf"], "--rates"),
    # the programs on the real model: refused before any model is loaded or node started
    ("bench.serve", ["--requests", "0"], "--requests"),
    ("bench.serve", ["--concurrency", "-1"], "--concurrency"),
    ("bench.layouts", ["--duration", "nan"], "--duration"),
    ("bench.engine", ["--new-tokens", "0"], "--new-tokens"),
    ("bench.quality", ["--window", "1"], "--window"),
    ("bench.quality", ["--mmlu", "-2"], "--mmlu"),
    ("bench.structured", ["--repeats", "0"], "--repeats"),
    ("bench.tiers", ["--budget-min", "0"], "--budget-min"),
    ("bench.transfer", ["--rounds", "0"], "--rounds"),
    ("bench.profile", ["--network-gbps", "inf"], "--network-gbps"),
    ("bench.fuzz", ["--timeout", "0"], "--timeout"),
    ("bench.first_token_hop", ["--requests", "-1"], "--requests"),
]


@pytest.mark.parametrize("module, argv, names", ARGPARSE_ERRORS, ids=lambda v: v if isinstance(v, str) else " ".join(v))
def test_a_flag_out_of_range_is_named_and_exits_2(module, argv, names, capsys):
    main = importlib.import_module(module).main
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {names}" in err and "Traceback" not in err


RUN_ERRORS = [
    ("bench.sim.scale", ["--requests", "20", "--nodes", "4", "--policy", "nope"], "unknown policy 'nope'"),
    ("bench.sim.scale", ["--requests", "20", "--nodes", "4", "--json", "/proc/no/such/dir/x.json"], "No such file"),
    ("bench.sim.compare", ["policies", "--workloads", "uniform", "--requests", "40", "--decode-threshold", "1e12"],
     "decode_reject_threshold"),
    ("bench.sim.elastic", ["--requests", "300", "--nodes", "6", "--splits", "6"], "at least one prefill and one decode"),
    ("bench.sim.elastic", ["--requests", "300", "--nodes", "6", "--initial-prefill", "9"], "initial_prefill"),
]


@pytest.mark.parametrize("module, argv, says", RUN_ERRORS, ids=lambda v: v if isinstance(v, str) else " ".join(v))
def test_what_a_run_refuses_is_one_line_and_exit_2(module, argv, says, capsys):
    prog = f"python -m {module}"
    assert importlib.import_module(module).main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"{prog}: ") and says in err and "Traceback" not in err


def test_a_decision_benchmark_with_no_room_for_a_conversation_says_so(capsys):
    from bench.conductor_decision import main

    assert main(["--nodes", "4", "--blocks", "2", "--decisions", "3"]) == 2  # was an IndexError
    assert "--blocks 2 for 4 nodes: more than 2" in capsys.readouterr().err


def test_the_flag_types_accept_what_they_should_and_nothing_else():
    assert flags.count(2)("2") == 2 and flags.SEED("0") == 0
    assert flags.positive("0.5") == 0.5 and flags.non_negative("0") == 0.0 and flags.fraction("1") == 1.0
    assert flags.positives("1, 2.5,") == [1.0, 2.5] and flags.counts(1)("2,3") == [2, 3]
    assert flags.names(("a", "b"))("b,a") == ["b", "a"]
    for parse, text in [(flags.count(2), "1"), (flags.count(0), "1.5"), (flags.positive, "0"), (flags.positive, "inf"),
                        (flags.positive, "-nan"), (flags.non_negative, "-0.1"), (flags.fraction, "1.01"), (flags.fraction, "0"), (flags.positives, ""),
                        (flags.positives, "1,x"), (flags.counts(1), "0"), (flags.names(("a",)), "a,c"),
                        (flags.names(("a",)), ",")]:
        with pytest.raises(argparse.ArgumentTypeError):
            parse(text)
