"""Structured output: what a JSON-schema constraint costs and how well it holds.

    halfmoon bench structured --json OUT [--batches 1,8,32] [--new-tokens 32] [--max-tokens 256]

Measured in one engine process, side by side (timings on a shared machine are noisy: read
the ratios):

- decode tokens/s and ms per decode step at each batch size, unconstrained and under a JSON
  schema (a list of records, long enough that no request ends inside the window), the two
  interleaved `--repeats` times (medians). The constrained run has fast-forward off, so
  every step is one decode token per request and the difference is the grammar's cost (a
  greedy request's pick is checked against its grammar first and masked only when refused,
  counted as `greedy_check_misses` of `greedy_checks`); it is
  also run with mask computation serial instead of overlapped with the forward pass, and
  with fast-forward on (tokens/s then counts the forced tokens, fed as chunks);
- mask time per token, p50 / p99 (one matcher at a time, replaying the compliance run's
  outputs), and the time the engine thread waited on masks per step (what overlap hid not);
- compile time p50 / p99 over the schema set (`bench.structured_schemas`: the schemas
  check-jsonschema vendors plus hand-written ones), from schema text to a ready matcher;
- compliance: every schema the backend accepts (strict mode refuses keywords it cannot
  enforce; lenient accepts the rest best-effort), one greedy output each, parsed and
  validated with `jsonschema` (formats checked); outputs cut by max_tokens are counted;
- the share of output tokens that were fast-forwarded (forced by the grammar, no step).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from bench import flags

WINDOW_SCHEMA = {
    "type": "object", "additionalProperties": False, "required": ["people"],
    "properties": {"people": {"type": "array", "minItems": 40, "items": {
        "type": "object", "additionalProperties": False, "required": ["name", "age", "city"],
        "properties": {"name": {"type": "string", "maxLength": 16}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
                       "city": {"enum": ["Paris", "Rome", "Berlin", "Madrid", "Lisbon", "Vienna"]}}}}}}


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def _decode_window(eng, batch: int, new_tokens: int, constraint) -> dict:
    """Tokens/s and ms/step over `new_tokens` decode steps with `batch` requests running."""
    from engine.sampling import SamplingParams
    from engine.tokenizer import Message

    for i in range(batch):
        eng.add_request(f"w{i}", SamplingParams(max_tokens=new_tokens + 64, ignore_eos=True, constraint=constraint),
                        messages=[Message("user", f"List {40 + i} people with their age and city as JSON.")])
    while eng.scheduler.waiting or any(r.num_computed_tokens < len(r.prompt_token_ids) for r in eng.scheduler.running):
        eng.step()  # until every prompt is computed
    tokens, steps, spent = 0, 0, 0.0
    wait0, checks0, misses0 = eng.masks.stats.wait_s, eng.masks.stats.checks, eng.masks.stats.check_misses
    for _ in range(new_tokens):
        t = time.perf_counter()
        outs = eng.step()
        spent += time.perf_counter() - t
        steps += 1
        tokens += sum(len(o.new_token_ids) for o in outs)
        if len(eng.scheduler.running) < batch:
            break
    for i in range(batch):
        eng.abort(f"w{i}")
    return {"tokens_per_s": tokens / spent, "ms_per_step": 1e3 * spent / steps, "steps": steps, "tokens": tokens,
            "mask_wait_ms_per_step": 1e3 * (eng.masks.stats.wait_s - wait0) / steps,
            "greedy_checks": eng.masks.stats.checks - checks0, "greedy_check_misses": eng.masks.stats.check_misses - misses0}


def _median_run(runs: list[dict]) -> dict:
    """Each number's median over the runs."""
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def _compile_times(cases, backend) -> tuple[list[float], dict[str, str]]:
    import llguidance as llg

    from engine.structured import Constraint
    from engine.structured.backend import grammar_text

    times, refused = [], {}
    for case in cases:
        for strict in (True, False):
            c = Constraint("json_schema", case.schema, strict=strict)
            t = time.perf_counter()
            try:
                c.validate()
                m = llg.LLMatcher(backend.tokenizer, grammar_text(c), log_level=0)
                ok = not m.is_error()
            except Exception:
                ok = False
            if ok:
                times.append(time.perf_counter() - t)
                break
            refused[case.name] = "refused in strict and lenient mode"
    return times, refused


def _compliance(eng, cases, max_tokens: int) -> dict:
    import jsonschema

    from engine.errors import InvalidRequestError
    from engine.sampling import SamplingParams
    from engine.structured import Constraint
    from engine.tokenizer import Message

    accepted, refused = {}, {}
    for case in cases:
        for strict in (True, False):
            c = Constraint("json_schema", case.schema, strict=strict)
            try:
                eng.check_params(SamplingParams(constraint=c))
            except InvalidRequestError as e:
                refused.setdefault(case.name, []).append(f"{'strict' if strict else 'lenient'}: {e.message[:120]}")
                continue
            accepted[case.name] = (case, c)
            break
    forced0 = eng.num_forced_tokens
    outs: dict[str, list[int]] = {n: [] for n in accepted}
    reasons: dict[str, str] = {}
    for name, (case, c) in accepted.items():
        eng.add_request(name, SamplingParams(max_tokens=max_tokens, constraint=c), messages=[Message("user", case.task)])
    while eng.has_unfinished():
        for o in eng.step():
            outs[o.request_id] += o.new_token_ids
            if o.finished:
                reasons[o.request_id] = o.finish_reason.value
    results = {}
    checker = jsonschema.FormatChecker()
    for name, (case, c) in accepted.items():
        text = eng.tokenizer.decode(outs[name])
        try:
            jsonschema.validate(json.loads(text), json.loads(case.schema), format_checker=checker)
            verdict = "valid"
        except json.JSONDecodeError:
            verdict = "not JSON" + (" (cut by max_tokens)" if reasons[name] == "length" else "")
        except jsonschema.ValidationError as e:
            verdict = f"invalid: {e.message[:100]}"
        results[name] = {"verdict": verdict, "strict": c.strict, "finish": reasons[name], "tokens": len(outs[name]),
                         "real": case.real}
    total = sum(len(v) for v in outs.values())
    valid = sum(r["verdict"] == "valid" for r in results.values())
    strict = [r for r in results.values() if r["strict"]]
    return {"schemas": len(cases), "accepted": len(accepted), "refused": refused, "valid": valid,
            "compliance": valid / max(1, len(accepted)),
            "strict_accepted": len(strict), "strict_compliance": sum(r["verdict"] == "valid" for r in strict) / max(1, len(strict)),
            "forced_share": (eng.num_forced_tokens - forced0) / max(1, total), "output_tokens": total,
            "per_schema": results, "outputs": outs, "constraints": {n: c for n, (_, c) in accepted.items()}}


def _mask_times(eng, compliance: dict) -> list[float]:
    """Per-token mask time, one matcher at a time, replaying each accepted schema's output."""
    times = []
    for name, c in compliance["constraints"].items():
        m = eng.grammar.matcher(c)
        for tok in compliance["outputs"][name]:
            t = time.perf_counter()
            m.compute_bitmask()
            times.append(time.perf_counter() - t)
            if not m.consume_token(tok) or m.is_stopped():
                break
    return times


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="halfmoon bench structured", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--new-tokens", type=flags.count(1), default=32, help="decode steps timed per batch size")
    ap.add_argument("--max-tokens", type=flags.count(1), default=256, help="per compliance output")
    ap.add_argument("--threads", type=flags.count(1), default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--repeats", type=flags.count(1), default=3, help="interleaved runs of each decode window (medians)")
    ap.add_argument("--skip-decode", action="store_true")
    args = ap.parse_args(argv)

    from bench.structured_schemas import all_schemas
    from engine.config import EngineConfig
    from engine.engine import LLMEngine
    from engine.structured import Constraint

    batches = [int(b) for b in args.batches.split(",") if b]
    eng = LLMEngine(args.model, EngineConfig(num_blocks=4096, max_num_seqs=max(64, max(batches, default=1)),
                                             num_threads=args.threads))
    cases = all_schemas()
    result: dict = {"machine": {"cpus": os.cpu_count(), "loadavg_1m_start": os.getloadavg()[0]}}

    compile_s, _ = _compile_times(cases, eng.grammar)
    result["compile_ms"] = {"p50": 1e3 * _pct(compile_s, 0.5), "p99": 1e3 * _pct(compile_s, 0.99), "n": len(compile_s)}
    comp = _compliance(eng, cases, args.max_tokens)
    masks = _mask_times(eng, comp)
    result["mask_us_per_token"] = {"p50": 1e6 * _pct(masks, 0.5), "p99": 1e6 * _pct(masks, 0.99), "n": len(masks)}
    result["compliance"] = {k: v for k, v in comp.items() if k not in ("outputs", "constraints")}

    if not args.skip_decode:
        window = Constraint.json_schema(WINDOW_SCHEMA)
        rows = []
        for b in batches:
            runs: dict[str, list[dict]] = {"plain": [], "json_schema": [], "json_schema_serial_masks": [],
                                           "json_schema_fast_forward": []}
            for _ in range(args.repeats):
                eng.fast_forward = False
                runs["plain"].append(_decode_window(eng, b, args.new_tokens, None))
                runs["json_schema"].append(_decode_window(eng, b, args.new_tokens, window))
                eng.masks.overlap = False
                runs["json_schema_serial_masks"].append(_decode_window(eng, b, args.new_tokens, window))
                eng.masks.overlap, eng.fast_forward = True, True
                runs["json_schema_fast_forward"].append(_decode_window(eng, b, args.new_tokens, window))
            row = {"batch": b, **{k: _median_run(v) for k, v in runs.items()}}
            row["step_slowdown"] = row["json_schema"]["ms_per_step"] / row["plain"]["ms_per_step"] - 1
            row["step_slowdown_serial"] = row["json_schema_serial_masks"]["ms_per_step"] / row["plain"]["ms_per_step"] - 1
            rows.append(row)
        result["decode"] = rows
    result["machine"]["loadavg_1m_end"] = os.getloadavg()[0]

    c = result["compliance"]
    print(f"schemas {c['schemas']}, accepted {c['accepted']} (strict {c['strict_accepted']}), valid {c['valid']}: "
          f"compliance {c['compliance']:.1%} (strict {c['strict_compliance']:.1%}); "
          f"fast-forwarded {c['forced_share']:.1%} of {c['output_tokens']} output tokens")
    print(f"compile p50 {result['compile_ms']['p50']:.2f} ms  p99 {result['compile_ms']['p99']:.2f} ms; "
          f"mask p50 {result['mask_us_per_token']['p50']:.1f} us  p99 {result['mask_us_per_token']['p99']:.1f} us")
    for name, r in c["per_schema"].items():
        if r["verdict"] != "valid":
            print(f"  {name}: {r['verdict']} ({r['finish']}, {r['tokens']} tokens)")
    for r in result.get("decode", []):
        print(f"batch {r['batch']:>3}: plain {r['plain']['tokens_per_s']:7.1f} tok/s {r['plain']['ms_per_step']:7.1f} ms/step"
              f" | json_schema {r['json_schema']['tokens_per_s']:7.1f} tok/s {r['json_schema']['ms_per_step']:7.1f} ms/step"
              f" ({r['step_slowdown']:+.1%}; serial masks {r['step_slowdown_serial']:+.1%}; mask wait "
              f"{r['json_schema']['mask_wait_ms_per_step']:.2f} ms/step; greedy picks the grammar refused "
              f"{r['json_schema']['greedy_check_misses']:.0f}/{r['json_schema']['greedy_checks']:.0f}) | fast-forward "
              f"{r['json_schema_fast_forward']['tokens_per_s']:7.1f} tok/s")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
