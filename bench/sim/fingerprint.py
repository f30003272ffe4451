"""A hash of every decision and outcome of a few seeded simulator runs: what an optimisation
of the simulator or the conductor's core must leave bit-identical.

    python -m bench.sim.fingerprint            # print each case's hash
    python -m bench.sim.fingerprint --check    # compare with tests/bench/sim_fingerprints.json

Per request, in order: its index, prefill and decode node, outcome, rejection reason and
stage, whether it was rejected after its prefill, prefix blocks hit, and the exact floats
(`float.hex`) of its prefill start and end, first token and finish; then every number
`bench.sim.metrics.summarize` reports for the run. The cases cover the
workloads, the policies and admission modes, and clusters on both sides of
`conductor.policies.SCAN_LIMIT` (above it the `LoadIndex` picks the candidates).
`--update` rewrites the file (only when a change of decisions is meant).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Sequence

from bench.sim.cluster import SimConfig, SimRun, simulate
from bench.sim.compare import at_load, base_requests
from bench.sim.metrics import summarize
from conductor.cost_model import gpu_class_default
from conductor.modes import AdmissionMode, PolicyName

GOLDEN = Path(__file__).resolve().parents[2] / "tests" / "bench" / "sim_fingerprints.json"


@dataclass(frozen=True, slots=True)
class Case:
    name: str
    workload: str
    requests: int
    prefill_nodes: int
    decode_nodes: int
    load: float
    policy: PolicyName = PolicyName.COST_AWARE
    admission: AdmissionMode = AdmissionMode.EARLY
    cache_blocks: int = 2_000
    seed: int = 1


# Small enough to run in seconds together; large-cluster cases have > 64 nodes per role.
CASES: tuple[Case, ...] = (
    Case("conversation-8x8-cost_aware-early", "conversation", 1_500, 8, 8, 1.2),
    Case("conversation-8x8-kv_centric-none", "conversation", 1_500, 8, 8, 1.2, PolicyName.KV_CENTRIC,
         AdmissionMode.NONE),
    Case("tool_agent-8x8-longest_prefix-early", "tool_agent", 1_500, 8, 8, 1.5, PolicyName.LONGEST_PREFIX),
    Case("shifting-8x8-cost_aware-none", "shifting", 1_500, 8, 8, 1.1, admission=AdmissionMode.NONE),
    Case("uniform-96x96-cost_aware-early", "uniform", 4_000, 96, 96, 1.8, cache_blocks=300),
    Case("tool_agent-96x96-cost_aware-early", "tool_agent", 4_000, 96, 96, 2.0),
    Case("conversation-80x80-kv_centric-early", "conversation", 3_000, 80, 80, 1.5, PolicyName.KV_CENTRIC),
    Case("shifting-96x96-cost_aware-predictive", "shifting", 3_000, 96, 96, 2.0,
         admission=AdmissionMode.PREDICTIVE),
    Case("uniform-8x8-cost_aware-per_stage", "uniform", 1_500, 8, 8, 1.6, admission=AdmissionMode.PER_STAGE),
    Case("uniform-2048x2048-scale", "uniform", 20_000, 2048, 2048, 0.8, cache_blocks=500),  # bench.sim.scale's shape
)


def run_case(case: Case) -> SimRun:
    costs = gpu_class_default()
    config = SimConfig(prefill_nodes=case.prefill_nodes, decode_nodes=case.decode_nodes, policy=case.policy,
                       admission=case.admission, cache_blocks=case.cache_blocks, record_events=False, seed=case.seed)
    requests, _ = at_load(base_requests(case.workload, case.requests, case.seed), case.load, config, costs)
    typical = max(1, round(sum(r.output_tokens for r in requests) / len(requests)))
    return simulate(requests, replace(config, typical_output_tokens=typical), costs)


def fingerprint(run: SimRun) -> str:
    h = hashlib.sha256()
    summary = asdict(summarize(run, speedup=1.0, wall_s=0.0))
    h.update(repr(sorted((k, v.hex() if isinstance(v, float) else v) for k, v in summary.items())).encode())
    for st in run.states:
        rej = st.rejection
        h.update(repr((
            st.req.index, st.prefill_node, st.decode_node, st.outcome.value,
            "" if rej is None else f"{rej.reason}@{rej.stage}", st.rejected_after_prefill, st.hit_blocks,
            st.prefill_start_s.hex(), st.prefill_end_s.hex(), st.first_token_s.hex(), st.finish_s.hex(),
        )).encode())
    return h.hexdigest()


def fingerprints(cases: Sequence[Case] = CASES) -> dict[str, str]:
    return {case.name: fingerprint(run_case(case)) for case in cases}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.sim.fingerprint", description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help=f"compare with {GOLDEN.name}")
    p.add_argument("--update", action="store_true", help=f"rewrite {GOLDEN.name}")
    p.add_argument("--only", default="", help="comma-separated case names")
    args = p.parse_args(argv)
    wanted = {n for n in args.only.split(",") if n}
    cases = [c for c in CASES if not wanted or c.name in wanted]
    golden = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
    got = {}
    bad = 0
    for case in cases:
        got[case.name] = digest = fingerprint(run_case(case))
        mark = "" if not args.check else ("  ok" if golden.get(case.name) == digest else "  DIFFERS")
        bad += mark == "  DIFFERS"
        print(f"{case.name:42s} {digest[:16]}{mark}", flush=True)
    if args.update:
        GOLDEN.write_text(json.dumps({**golden, **got}, indent=2) + "\n", encoding="utf-8")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
