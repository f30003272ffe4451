"""Tokenizer and chat template, loaded from an HF model directory without importing transformers."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import jinja2
from tokenizers import Tokenizer as _HFTokenizer
from tokenizers.models import BPE

from engine.errors import InvalidRequestError, ModelLoadError


@dataclass(frozen=True, slots=True)
class Message:
    role: str
    content: str


_ROLES = ("system", "user", "assistant")


class Tokenizer:
    def __init__(self, model_dir: Path) -> None:
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise ModelLoadError(f"{path} not found")
        self._tok = _HFTokenizer.from_file(str(path))
        self.path = path  # tokenizer.json (the constrained-decoding backend builds its own from it)
        cfg_path = model_dir / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        template = cfg.get("chat_template")
        if (model_dir / "chat_template.jinja").is_file():
            template = (model_dir / "chat_template.jinja").read_text()
        env = jinja2.Environment(trim_blocks=False, lstrip_blocks=False, keep_trailing_newline=True)
        self._template = env.from_string(template) if template else None
        self._special = {k: cfg.get(k) for k in ("bos_token", "eos_token")}
        self.vocab_size = self._tok.get_vocab_size()
        self.max_token_chars = self._max_token_chars()

    def encode(self, text: str) -> list[int]:
        # encode_batch releases the GIL while it works (encode holds it: ~2 s for 4 MB of text),
        # so other threads, e.g. an asyncio loop, keep running meanwhile
        return self._tok.encode_batch([text], add_special_tokens=False)[0].ids

    def _max_token_chars(self) -> int | None:
        """The most characters of text one token can stand for, or None if unbounded: a text
        longer than n * this needs more than n tokens, which is known before tokenizing it.
        The longest vocabulary entry (a byte-level entry spells one byte per character), times
        4 under a normalizer that could compose characters (NFC joins at most 3 into 1).
        Unbounded (None) unless the model is BPE without an unknown token or with byte
        fallback: an unknown token can stand for a whole word."""
        model = self._tok.model
        if not isinstance(model, BPE) or (model.unk_token is not None and not model.byte_fallback):
            return None
        longest = max(map(len, self._tok.get_vocab(with_added_tokens=True)), default=1)
        return longest * (4 if self._tok.normalizer is not None else 1)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[Message], add_generation_prompt: bool = True) -> str:
        if self._template is None:
            raise InvalidRequestError("messages", "this model has no chat template; send a plain prompt")
        if not messages:
            raise InvalidRequestError("messages", "must contain at least one message")
        for i, m in enumerate(messages):
            if m.role not in _ROLES:
                raise InvalidRequestError(f"messages[{i}].role", f"must be one of {_ROLES}, got {m.role!r}")
        return self._template.render(
            messages=[{"role": m.role, "content": m.content} for m in messages],
            add_generation_prompt=add_generation_prompt,
            **self._special,
        )

    def encode_chat(self, messages: list[Message]) -> list[int]:
        return self.encode(self.apply_chat_template(messages))


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas, holding back incomplete UTF-8."""

    def __init__(self, tokenizer: Tokenizer, prompt_tail: list[int] | None = None) -> None:
        self._tok = tokenizer
        self._ids: list[int] = []
        self._emitted = ""

    def push(self, new_ids: list[int]) -> str:
        self._ids.extend(new_ids)
        text = self._tok.decode(self._ids)
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the rest
            return ""
        delta = text[len(self._emitted):] if text.startswith(self._emitted) else text
        self._emitted = text
        return delta

    @property
    def text(self) -> str:
        return self._emitted
