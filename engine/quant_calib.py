"""W8A8 with SmoothQuant: calibrate once on local text, quantize, cache.

1. Calibration: the fp32 model prefills `CALIB_SEQS` x `CALIB_LEN` tokens of text that ships
   with Python itself (`pydoc_data.topics`, the language reference's help topics: always
   installed, nothing downloaded), recording each layer linear's per-input-channel max |x|.
2. Smoothing (SmoothQuant, alpha = 0.5): for an input channel j with activation max a_j and
   weight max w_j (over the rows of every linear reading that input),
   s_j = a_j^alpha / w_j^(1 - alpha); the input is divided by s and the weight columns
   multiplied by it, which leaves the product unchanged but moves outliers from the
   activations (quantized per token) into the weights (quantized per channel). The division
   is folded where it costs nothing: into input_layernorm (Q/K/V), post_attention_layernorm
   (gate/up), and into the rows of up_proj for down_proj (silu(g) * (u / s) = (silu(g) * u) / s).
   o_proj is not smoothed (its input comes from attention; folding into v_proj would also
   change what the KV cache holds).
3. Quantization: every layer linear to int8 per output row (`engine.quant.quantize_int8_rows`);
   the LM head per `engine.quant.W8A8_LM_HEAD` (`lm_head`): "w8a16" (the default) stores the
   head as int8 with a scale per row and per 32 columns under `lm_head.weight` (a tied head
   untied) and the embedding table in bfloat16; "bf16" both in bfloat16; "int8" the tied table
   as int8 rows. The norms stay fp32. (Where the head loses: the int8 activations of "int8" cost
   w8a8 1.4 points of top-1 on 8 x 512 fortune tokens (0.961 -> 0.947; 0.928 with per-token
   activations); on 20 x 512 (w8a8's own layers, a fake-quantized fp32 head over bf16
   activations) int8 weights per row cost 0.4 points (0.9572 -> 0.9536), per 64 columns 0.3
   (0.9541), per 32 columns nothing (0.9576), and an int8 embedding another 0.4; the "w8a16"
   head in the engine measured 0.9569 against the bf16 head's 0.9576. Alpha 0.5 beat 0.65 and 0.8.)

The result is an HF-style directory under ``$HALFMOON_CACHE/models/<model>-w8a8-<key>``
(`<key>` hashes the source weights and this recipe), written atomically and under a file lock
(nodes starting together calibrate once). `halfmoon quantize` produces it ahead of time;
`load_model(dtype="w8a8")` produces it on first use.

fp8 (`ensure_fp8`, `halfmoon quantize --dtype fp8`, or on first use) is calibrated the same way
but for GPTQ: the fp32 model prefills the same text, each layer linear's input accumulates
X^T X (Q/K/V share one, gate/up one; o and down their own), and every layer linear is rounded
onto the fp8b grid (E4M3 per row and per 32 columns) by `engine.gptq` with `GptqSettings`
(columns in descending order of diag H, dampening 0.3 of its mean diagonal, 128-column blocks);
cached as ``<model>-fp8-<key>`` with its own `quantization.json`. No smoothing: fp8b's
activations are bfloat16.
"""
from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from engine.gptq import ACT_ORDER as GPTQ_ACT_ORDER
from engine.gptq import BLOCK as GPTQ_BLOCK
from engine.gptq import DAMP as GPTQ_DAMP
from engine.gptq import STATIC_GROUPS as GPTQ_STATIC_GROUPS
from engine.gptq import gptq_batch
from engine.quant import ACT_BITS, FP8_GROUP, W8A16_GROUP, QLinear, quantize_int8_rows, recipe

log = logging.getLogger(__name__)

RECIPE_VERSION = 2  # 2: LM head / embedding in bfloat16 (was int8)
ALPHA = 0.5
HEAD_NAMES = ("model.embed_tokens.weight", "lm_head.weight")
HEAD_FORMS = ("bf16", "int8", "w8a16")
CALIB_SEQS = 16
CALIB_LEN = 512
CALIB_SOURCE = "pydoc_data.topics (Python's language-reference help text)"


def calibration_text() -> str:
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    return "\n\n".join(topics[k] for k in sorted(topics))


def calibration_ids(tokenizer, n_seqs: int = CALIB_SEQS, seq_len: int = CALIB_LEN) -> list[list[int]]:
    ids = tokenizer.encode(calibration_text())
    if len(ids) < n_seqs * seq_len:
        raise ValueError(f"calibration text has {len(ids)} tokens, {n_seqs} x {seq_len} wanted")
    return [ids[i * seq_len:(i + 1) * seq_len] for i in range(n_seqs)]


def collect_input_absmax(model_dir: Path, n_seqs: int = CALIB_SEQS, seq_len: int = CALIB_LEN
                         ) -> dict[tuple[int, str], torch.Tensor]:
    """Per-input-channel max |x| of every layer linear's input over the calibration prompts."""
    stats: dict[tuple[int, str], torch.Tensor] = {}

    def observe(li: int, name: str, x: torch.Tensor) -> None:
        m = x.detach().abs().amax(dim=0)
        prev = stats.get((li, name))
        stats[(li, name)] = m if prev is None else torch.maximum(prev, m)

    _calibrate(model_dir, n_seqs, seq_len, observe)
    return stats


def collect_hessians(model_dir: Path, n_seqs: int = CALIB_SEQS, seq_len: int = CALIB_LEN
                     ) -> dict[tuple[int, str], torch.Tensor]:
    """X^T X (float64 [K, K]) of every layer linear's input over the calibration prompts, keyed
    (layer, "qkv" | "o" | "gate_up" | "down"): GPTQ's Hessians (engine/gptq.py), from the
    float32 model."""
    hs: dict[tuple[int, str], torch.Tensor] = {}

    def observe(li: int, name: str, x: torch.Tensor) -> None:
        xx = (x.detach().t() @ x.detach()).double()
        prev = hs.get((li, name))
        hs[(li, name)] = xx if prev is None else prev.add_(xx)

    _calibrate(model_dir, n_seqs, seq_len, observe)
    return hs


def _calibrate(model_dir: Path, n_seqs: int, seq_len: int, observe) -> None:
    """Prefill the calibration prompts through the float32 model, `observe(layer, linear, x)`
    seeing every layer linear's input (`LlamaModel.observer`)."""
    from engine.config import EngineConfig
    from engine.engine import LLMEngine
    from engine.sampling import SamplingParams

    eng = LLMEngine(model_dir, EngineConfig(num_blocks=n_seqs * (seq_len // 16 + 2), max_num_batched_tokens=seq_len,
                                            max_num_seqs=n_seqs, dtype="float32"))
    eng.runner.model.observer = observe
    eng.generate(calibration_ids(eng.tokenizer, n_seqs, seq_len), SamplingParams(max_tokens=1))


def smooth_scales(act_max: torch.Tensor, weights: list[torch.Tensor], alpha: float = ALPHA) -> torch.Tensor:
    """s_j = max|x_j|^alpha / max|W[:, j]|^(1 - alpha) over `weights` (each [N, K]); 1 where
    either max is 0."""
    w_max = torch.stack([w.abs().amax(dim=0) for w in weights]).amax(dim=0)
    s = act_max.float().pow(alpha) / w_max.float().pow(1 - alpha)
    ok = (act_max > 0) & (w_max > 0) & torch.isfinite(s)
    return torch.where(ok, s.clamp(1e-5, 1e5), torch.ones_like(s))


def smooth(w: dict[str, torch.Tensor], stats: dict[tuple[int, str], torch.Tensor], num_layers: int,
           alpha: float = ALPHA) -> dict[str, torch.Tensor]:
    """The fp32 state dict with SmoothQuant's scales folded in (the same function, up to
    rounding: the tests check it)."""
    w = {k: v.float().clone() for k, v in w.items()}
    for i in range(num_layers):
        p = f"model.layers.{i}."
        q, k, v = (w[p + f"self_attn.{n}_proj.weight"] for n in "qkv")
        s = smooth_scales(stats[(i, "qkv")], [q, k, v], alpha)
        w[p + "input_layernorm.weight"] /= s
        for t in (q, k, v):
            t *= s
        g, u = w[p + "mlp.gate_proj.weight"], w[p + "mlp.up_proj.weight"]
        s = smooth_scales(stats[(i, "gate_up")], [g, u], alpha)
        w[p + "post_attention_layernorm.weight"] /= s
        g *= s
        u *= s
        d = w[p + "mlp.down_proj.weight"]
        s = smooth_scales(stats[(i, "down")], [d], alpha)
        u /= s.unsqueeze(1)
        d *= s
    return w


def quantize_state(w: dict[str, torch.Tensor], lm_head: str = "bf16") -> dict[str, torch.Tensor]:
    """int8 codes + `<name>_scale` for every layer linear, the embedding / LM head in bfloat16
    (`lm_head` "bf16"), as int8 rows with their scales ("int8"), or ("w8a16") the embedding in
    bfloat16 and the head (a tied one untied) as int8 with a scale per row and per 32 columns
    under `lm_head.weight`, marked
    `lm_head.weight_act_bits` = 16 (its activations in int16), the rest as is."""
    if lm_head not in HEAD_FORMS:
        raise ValueError(f"w8a8 LM head must be one of {', '.join(HEAD_FORMS)}, got {lm_head!r}")
    out: dict[str, torch.Tensor] = {}
    for name, t in w.items():
        if name.endswith("_proj.weight") or (lm_head == "int8" and name in HEAD_NAMES):
            out[name], out[name + "_scale"] = quantize_int8_rows(t)
        elif name in HEAD_NAMES:
            out[name] = t.to(torch.bfloat16)
        else:
            out[name] = t
    if lm_head == "w8a16":  # the head alone in int8, as lm_head.weight; the embedding table stays bf16
        head = w["lm_head.weight"] if "lm_head.weight" in w else w["model.embed_tokens.weight"]
        q = QLinear.make("w8a16", head)  # int8 per row and per W8A16_GROUP columns
        out["lm_head.weight"], out["lm_head.weight_scale"] = q.weight, q.scale
        out["lm_head.weight" + ACT_BITS] = torch.tensor(16, dtype=torch.int32)
    return out


def _key(model_dir: Path, n_seqs: int, seq_len: int, recipe_fields: dict) -> str:
    """A cache key: the recipe's fields, the calibration text and the source model (its config
    and weight files' names, sizes and mtimes), hashed."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    ident = {**recipe_fields, "calib": [CALIB_SOURCE, n_seqs, seq_len],
             "config": (Path(model_dir) / "config.json").read_text(),
             "weights": [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:12]


def cache_key(model_dir: Path, n_seqs: int, seq_len: int, alpha: float, lm_head: str = "bf16") -> str:
    fields: dict = {"recipe": RECIPE_VERSION, "alpha": alpha}
    if lm_head != "bf16":  # (absent for bf16: the caches made before the option keep their key)
        fields["lm_head"] = lm_head if lm_head != "w8a16" else f"w8a16 per {W8A16_GROUP} columns"
    return _key(model_dir, n_seqs, seq_len, fields)


def w8a8_dir(model_dir: Path, n_seqs: int = CALIB_SEQS, seq_len: int = CALIB_LEN, alpha: float = ALPHA,
             lm_head: str = "bf16") -> Path:
    from engine.loader import cache_root

    key = cache_key(model_dir, n_seqs, seq_len, alpha, lm_head)
    return cache_root() / "models" / f"{Path(model_dir).name}-w8a8-{key}"


def ensure_w8a8(model_dir: Path, *, n_seqs: int = CALIB_SEQS, seq_len: int = CALIB_LEN, alpha: float = ALPHA,
                lm_head: str = "bf16", progress: bool = True) -> Path:
    """The cached w8a8 directory of `model_dir`, calibrating and quantizing it first if needed."""
    from engine.config import ModelConfig
    from engine.loader import _read_weights

    def build() -> tuple[dict[str, torch.Tensor], dict]:
        cfg = ModelConfig.from_dir(model_dir)
        stats = collect_input_absmax(model_dir, n_seqs, seq_len)
        state = quantize_state(smooth(_read_weights(model_dir, lambda n, t: {n: t}), stats, cfg.num_layers, alpha),
                               lm_head)
        return state, {
            "dtype": "w8a8", "recipe_version": RECIPE_VERSION, "source": str(model_dir),
            "weights": "int8 per output channel (symmetric, absmax / 127); activations int8 per token, dynamic",
            "smoothquant": {"alpha": alpha, "folded": {"qkv": "input_layernorm", "gate_up": "post_attention_layernorm",
                                                       "down": "up_proj rows"}, "not_smoothed": ["o_proj"]},
            "lm_head_and_embedding": {"bf16": "bfloat16",
                                      "int8": "int8 per row (activations as the layers'; embedding rows dequantized)",
                                      "w8a16": "head int8 per row and 32 columns x int16 activations per token, "
                                               "embedding bfloat16 (untied: two tables)",
                                      }[lm_head] + ("" if lm_head == "w8a16" else " (tied models share one table)"),
            "calibration": {"source": CALIB_SOURCE, "sequences": n_seqs, "tokens_per_sequence": seq_len}}

    return _ensure_cached(w8a8_dir(model_dir, n_seqs, seq_len, alpha, lm_head), model_dir, build,
                          f"w8a8: calibrating SmoothQuant on {n_seqs} x {seq_len} tokens of {CALIB_SOURCE}", progress)


def _ensure_cached(out: Path, model_dir: Path, build, msg: str, progress: bool) -> Path:
    """`out`, produced first if it is not complete: `build()` gives (state dict, quantization.json's
    record); written atomically beside the cache under a file lock (another process producing it:
    wait, then reuse)."""
    if (out / ".complete").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (out / ".complete").is_file():
            return out
        t0 = time.perf_counter()
        (print if progress else log.info)(msg)
        state, info = build()
        tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file(state, str(tmp / "model.safetensors"))
        shutil.copy(Path(model_dir) / "config.json", tmp / "config.json")
        info["seconds"] = round(time.perf_counter() - t0, 1)
        (tmp / "quantization.json").write_text(json.dumps(info, indent=2))
        (tmp / ".complete").write_text("ok\n")
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
        (print if progress else log.info)(f"{info['dtype']}: wrote {out} in {time.perf_counter() - t0:.0f} s")
    return out


# --- fp8 (fp8b) with GPTQ's rounding -------------------------------------------------------

FP8_RECIPE_VERSION = 1
# each Hessian's input and the linears that read it, stacked along N (as engine.model fuses them)
LINEAR_INPUTS = {"qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "o": ("self_attn.o_proj",),
                 "gate_up": ("mlp.gate_proj", "mlp.up_proj"), "down": ("mlp.down_proj",)}


@dataclass(frozen=True, slots=True)
class GptqSettings:
    """How fp8's GPTQ rounds (engine/gptq.py)."""

    damp: float = GPTQ_DAMP
    block: int = GPTQ_BLOCK
    static_groups: bool = GPTQ_STATIC_GROUPS
    act_order: bool = GPTQ_ACT_ORDER


def gptq_fp8_state(w: dict[str, torch.Tensor], hessians: dict[tuple[int, str], torch.Tensor], num_layers: int,
                   settings: GptqSettings = GptqSettings(), layers_at_once: int = 32) -> dict[str, torch.Tensor]:
    """The fp8 (fp8b) state dict: every layer linear as E4M3 codes + `<name>_scale` [N, K / 32]
    chosen by GPTQ for its input's Hessian (`collect_hessians`), the LM head / embedding in
    bfloat16, the rest as is. Linears of one kind are rounded `layers_at_once` layers together
    (`gptq_batch`)."""
    out = {n: (t.to(torch.bfloat16) if n in HEAD_NAMES else t) for n, t in w.items()
           if not n.endswith("_proj.weight")}
    for kind, parts in LINEAR_INPUTS.items():
        for l0 in range(0, num_layers, layers_at_once):
            layers = range(l0, min(num_layers, l0 + layers_at_once))
            names = [[f"model.layers.{i}.{p}.weight" for p in parts] for i in layers]
            ws = torch.stack([torch.cat([w[n].float() for n in ns]) for ns in names])
            codes, scales = gptq_batch(ws, torch.stack([hessians[(i, kind)] for i in layers]), grid="e4m3",
                                       group=FP8_GROUP, block=settings.block, damp=settings.damp,
                                       static_groups=settings.static_groups, act_order=settings.act_order)
            for b, ns in enumerate(names):
                r = 0
                for n in ns:
                    rows = w[n].shape[0]
                    out[n], out[n + "_scale"] = codes[b, r:r + rows].contiguous(), scales[b, r:r + rows].contiguous()
                    r += rows
    return out


def fp8_dir(model_dir: Path, n_seqs: int = CALIB_SEQS, seq_len: int = CALIB_LEN,
            settings: GptqSettings = GptqSettings()) -> Path:
    from engine.loader import cache_root

    key = _key(model_dir, n_seqs, seq_len, {"recipe": FP8_RECIPE_VERSION, "gptq": asdict(settings),
                                            "form": f"fp8b e4m3 per row and {FP8_GROUP} columns, bf16 head"})
    return cache_root() / "models" / f"{Path(model_dir).name}-fp8-{key}"


def ensure_fp8(model_dir: Path, *, n_seqs: int = CALIB_SEQS, seq_len: int = CALIB_LEN,
               settings: GptqSettings = GptqSettings(), progress: bool = True) -> Path:
    """The cached fp8 directory of `model_dir` (fp8b codes chosen by GPTQ), calibrating first if
    needed."""
    from engine.config import ModelConfig
    from engine.loader import _read_weights

    def build() -> tuple[dict[str, torch.Tensor], dict]:
        cfg = ModelConfig.from_dir(model_dir)
        t0 = time.perf_counter()
        hessians = collect_hessians(model_dir, n_seqs, seq_len)
        t1 = time.perf_counter()
        state = gptq_fp8_state(_read_weights(model_dir, lambda n, t: {n: t}), hessians, cfg.num_layers, settings)
        return state, {
            "dtype": "fp8", "recipe_version": FP8_RECIPE_VERSION, "source": str(model_dir),
            "weights": f"E4M3 codes with an absmax scale per output row and per {FP8_GROUP} input columns (fp8b), "
                       "the codes chosen by GPTQ (engine/gptq.py) for each linear's calibration Hessian X^T X",
            "gptq": asdict(settings) | {"hessians": "from the float32 model; qkv share one, gate_up one, o, down"},
            "activations": "bfloat16",
            "lm_head_and_embedding": "bfloat16 (tied models share one table)",
            "calibration": {"source": CALIB_SOURCE, "sequences": n_seqs, "tokens_per_sequence": seq_len},
            "seconds_hessians": round(t1 - t0, 1), "seconds_gptq": round(time.perf_counter() - t1, 1)}

    return _ensure_cached(fp8_dir(model_dir, n_seqs, seq_len, settings), model_dir, build,
                          f"fp8: calibrating GPTQ on {n_seqs} x {seq_len} tokens of {CALIB_SOURCE}", progress)


def main(argv: list[str] | None = None) -> int:
    """`halfmoon quantize`: produce (or find) the cached w8a8 or fp8 model."""
    from engine.loader import DEFAULT_MODEL, resolve_model_dir

    ap = argparse.ArgumentParser(prog="halfmoon quantize", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL, help="model name or Hugging Face directory")
    ap.add_argument("--dtype", default="w8a8", choices=["w8a8", "fp8"],
                    help="the calibrated dtypes (bfloat16, and fp8 rounded to nearest, convert while loading)")
    ap.add_argument("--calib-seqs", type=int, default=CALIB_SEQS)
    ap.add_argument("--calib-len", type=int, default=CALIB_LEN)
    ap.add_argument("--alpha", type=float, default=ALPHA)
    ap.add_argument("--lm-head", choices=list(HEAD_FORMS), default=recipe("w8a8").lm_head,
                    help="the LM head's (and tied embedding's) form (default: engine.quant.W8A8_LM_HEAD)")
    ap.add_argument("--damp", type=float, default=GPTQ_DAMP, help="fp8: GPTQ's dampening (x mean diag H)")
    args = ap.parse_args(argv)
    model_dir = resolve_model_dir(args.model)
    if args.dtype == "fp8":
        out = ensure_fp8(model_dir, n_seqs=args.calib_seqs, seq_len=args.calib_len,
                         settings=GptqSettings(damp=args.damp))
    else:
        out = ensure_w8a8(model_dir, n_seqs=args.calib_seqs, seq_len=args.calib_len, alpha=args.alpha,
                          lm_head=args.lm_head)
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
