"""llguidance as the constrained-decoding backend: a tokenizer built once from the model's
`tokenizer.json`, constraints compiled to grammars (cached), and one matcher per request.

JSON is generated compact but readable: `", "` between items, `": "` after keys, no other
whitespace (a model cannot then pad the output with endless newlines), and any escape JSON
allows. `check` is what both the conductor's intake and the nodes run before accepting a
request: it compiles the grammar with the model's tokenizer and refuses (naming the field)
one that does not compile or whose language is empty (a regex that matches nothing).
"""
from __future__ import annotations

import json
import threading
from collections import OrderedDict
from pathlib import Path

import llguidance as llg

from engine.errors import InvalidRequestError
from engine.structured.constraint import Constraint

JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_MAX_ERROR_CHARS = 400
_CACHE_SIZE = 512


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _MAX_ERROR_CHARS else text[: _MAX_ERROR_CHARS - 3] + "..."


def _limits() -> llg.LLParserLimits:
    return llg.LLParserLimits(verbose_errors=False)


def grammar_text(c: Constraint, field: str = "constraint") -> str:
    """The llguidance grammar of `c` (not yet checked against a tokenizer)."""
    try:
        if c.kind == "json_object":
            return llg.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_OPTIONS)
        if c.kind == "json_schema":
            options = dict(JSON_OPTIONS, lenient=not c.strict)
            return llg.LLMatcher.grammar_from_json_schema(c.spec, defaults=options)
        if c.kind == "regex":
            return llg.LLMatcher.grammar_from_regex(c.spec)
        if c.kind == "choice":
            return llg.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(s) for s in c.choices))
        return llg.grammar_from("grammar", c.spec)  # Lark, or GBNF / EBNF converted to Lark
    except ValueError as e:
        raise InvalidRequestError(field, f"does not compile: {_short(str(e))}") from None


class GrammarBackend:
    """One model's tokenizer as llguidance sees it, and compiled grammars for it."""

    def __init__(self, tokenizer_json: str, vocab_size: int, eos_token_ids: tuple[int, ...]) -> None:
        self.vocab_size = vocab_size
        self.tokenizer = llg.LLTokenizer(tokenizer_json, n_vocab=vocab_size, eos_token=list(eos_token_ids) or None)
        self._checked: OrderedDict[Constraint, str] = OrderedDict()  # constraint -> its grammar, known good
        self._lock = threading.Lock()

    def check(self, c: Constraint, field: str | None = None) -> str:
        """The grammar of `c`, known to compile and to accept some output; else
        `InvalidRequestError` naming `field` (default: where the client gave it)."""
        field = field or c.field_name
        with self._lock:
            grammar = self._checked.get(c)
            if grammar is not None:
                self._checked.move_to_end(c)
                return grammar
        c.validate(field)
        grammar = grammar_text(c, field)
        m = llg.LLMatcher(self.tokenizer, grammar, log_level=0, limits=_limits())
        if m.is_error():
            raise InvalidRequestError(field, f"does not compile: {_short(m.get_error())}")
        m.compute_bitmask()
        if m.is_error():
            what = {"regex": "the regex", "choice": "the choices", "grammar": "the grammar"}.get(c.kind, "the schema")
            raise InvalidRequestError(field, f"{what} matches nothing: {_short(m.get_error())}")
        with self._lock:
            self._checked[c] = grammar
            while len(self._checked) > _CACHE_SIZE:
                self._checked.popitem(last=False)
        return grammar

    def matcher(self, c: Constraint, field: str | None = None) -> llg.LLMatcher:
        """A fresh matcher for one request (checks `c` first)."""
        return llg.LLMatcher(self.tokenizer, self.check(c, field), log_level=0, limits=_limits())


_backends: dict[tuple[str, int, tuple[int, ...]], GrammarBackend] = {}
_backends_lock = threading.Lock()


def backend_for(tokenizer_path: Path | str, vocab_size: int, eos_token_ids: tuple[int, ...]) -> GrammarBackend:
    """The process's one backend per (tokenizer file, vocabulary, EOS ids): building the
    tokenizer takes ~0.5 s, so the conductor's intake and an in-process engine share it."""
    key = (str(Path(tokenizer_path).resolve()), vocab_size, tuple(eos_token_ids))
    with _backends_lock:
        backend = _backends.get(key)
        if backend is None:
            backend = _backends[key] = GrammarBackend(Path(tokenizer_path).read_text(), vocab_size, eos_token_ids)
        return backend
