"""Typed configuration of a model (from its HF `config.json`) and of the engine around it."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from engine.errors import ModelLoadError


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """The Llama-family hyper-parameters the forward pass needs."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]

    @classmethod
    def from_hf(cls, d: dict) -> "ModelConfig":
        arch = d.get("model_type", "llama")
        if arch not in ("llama", "mistral", "qwen2"):
            raise ModelLoadError(f"model_type {arch!r} is not a Llama-family model")
        if d.get("rope_scaling"):
            raise ModelLoadError(f"rope_scaling {d['rope_scaling']!r} is not supported")
        eos = d.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        heads = d["num_attention_heads"]
        return cls(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_layers=d["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=d.get("num_key_value_heads", heads),
            head_dim=d.get("head_dim") or d["hidden_size"] // heads,
            rope_theta=float(d.get("rope_theta", 10000.0)),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )

    @classmethod
    def from_dir(cls, model_dir: Path) -> "ModelConfig":
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise ModelLoadError(f"{path} not found: a model directory needs config.json")
        return cls.from_hf(json.loads(path.read_text()))

    def to_hf(self) -> dict:
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_ids) if len(self.eos_token_ids) != 1 else self.eos_token_ids[0],
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            "torch_dtype": "float32",
        }

    def kv_bytes_per_token(self, dtype_size: int = 4) -> int:
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * dtype_size


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Knobs of the serving engine: KV cache size and per-step scheduling budgets."""

    block_size: int = 16
    num_blocks: int = 2048
    max_num_batched_tokens: int = 512  # chunked-prefill token budget per step
    max_num_seqs: int = 64  # running batch limit
    max_model_len: int | None = None  # defaults to the model's context window
    num_threads: int | None = None  # torch intra-op threads; None keeps torch's choice
    dtype: str = "float32"  # weights and GEMMs: float32 | bfloat16 | w8a8 | fp8 (engine/quant.py)
    kv_dtype: str = "auto"  # KV cache: float32 | bfloat16 | auto (float32 for float32, else bfloat16)
    # w8a8: activations quantized per token and per this many input channels (0: per token, as
    # SmoothQuant; a linear whose width it does not divide falls back to per token)
    act_group: int = 64

    def validate(self) -> None:
        from engine.quant import DTYPES, KV_DTYPES

        for name in ("block_size", "num_blocks", "max_num_batched_tokens", "max_num_seqs"):
            if getattr(self, name) <= 0:
                raise ValueError(f"engine.{name} must be > 0, got {getattr(self, name)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"engine.dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.act_group < 0:
            raise ValueError(f"engine.act_group must be >= 0, got {self.act_group}")
        if self.kv_dtype != "auto" and self.kv_dtype not in KV_DTYPES:
            raise ValueError(f"engine.kv_dtype must be auto or one of {', '.join(KV_DTYPES)}, got {self.kv_dtype!r}")

    @property
    def kv_torch_dtype(self):
        """The KV cache's torch dtype (`kv_dtype`, with auto resolved by `dtype`)."""
        from engine.quant import KV_DTYPES, recipe

        return KV_DTYPES[recipe(self.dtype).kv_dtype if self.kv_dtype == "auto" else self.kv_dtype]
