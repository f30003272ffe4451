"""What a constrained request asks its output to be: a typed record, checked for shape.

Five kinds, each compiled by `engine.structured.backend` into an llguidance grammar:

| kind          | `spec`                              | the output is                               |
|---------------|-------------------------------------|---------------------------------------------|
| `json_object` | unused                              | one JSON object                             |
| `json_schema` | the schema, as JSON text            | one JSON value valid under the schema       |
| `regex`       | a regular expression (Rust syntax)  | a string the whole expression matches       |
| `choice`      | unused; `choices` lists the strings | exactly one of `choices`                    |
| `grammar`     | a Lark grammar (or GBNF / EBNF)     | a sentence of the grammar's `start` rule    |

`strict` (json_schema only), as in OpenAI's `response_format.json_schema.strict`: a schema
with a keyword the backend cannot enforce is refused (with it, every output is valid); without
it such keywords are ignored (best effort) and the rest is still enforced.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

from engine.errors import InvalidRequestError

KINDS = ("json_object", "json_schema", "regex", "choice", "grammar")
MAX_SPEC_CHARS = 1 << 20  # a schema, regex or grammar beyond 1 MiB of text is refused
MAX_CHOICES = 4096


@dataclass(frozen=True, slots=True)
class Constraint:
    kind: str
    spec: str = ""
    choices: tuple[str, ...] = ()
    strict: bool = False
    # the client's name for where this came from (e.g. "response_format.json_schema.schema"), for
    # error messages; not part of what the constraint is, and not sent between nodes
    source: str = field(default="", compare=False)

    @classmethod
    def json_schema(cls, schema: dict | bool | str, strict: bool = False, source: str = "") -> "Constraint":
        return cls("json_schema", schema if isinstance(schema, str) else json.dumps(schema), strict=strict,
                   source=source)

    @property
    def field_name(self) -> str:
        return self.source or "constraint"

    def validate(self, field: str = "constraint") -> None:
        """Shape only (types, sizes, a schema that is JSON); whether it compiles is the
        backend's `check`. Raises `InvalidRequestError` naming `field`."""
        if self.kind not in KINDS:
            raise InvalidRequestError(f"{field}.kind", f"must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if not isinstance(self.spec, str) or not isinstance(self.strict, bool):
            raise InvalidRequestError(field, "spec must be a string and strict a boolean")
        if len(self.spec) > MAX_SPEC_CHARS:
            raise InvalidRequestError(field, f"{len(self.spec)} characters; the limit is {MAX_SPEC_CHARS}")
        if self.kind == "json_schema":
            try:
                schema = json.loads(self.spec)
            except ValueError as e:
                raise InvalidRequestError(field, f"the schema is not JSON: {e}") from None
            if not isinstance(schema, (dict, bool)):
                raise InvalidRequestError(field, "the schema must be a JSON object (or true / false)")
        elif self.kind in ("regex", "grammar") and not self.spec:
            raise InvalidRequestError(field, f"the {self.kind} must not be empty")
        if self.kind == "choice":
            if not isinstance(self.choices, (tuple, list)) or not self.choices:
                raise InvalidRequestError(field, "choice needs a non-empty list of strings")
            if len(self.choices) > MAX_CHOICES:
                raise InvalidRequestError(field, f"{len(self.choices)} choices; the limit is {MAX_CHOICES}")
            for i, c in enumerate(self.choices):
                if not isinstance(c, str) or not c:
                    raise InvalidRequestError(f"{field}[{i}]", "choices must be non-empty strings")
            if sum(map(len, self.choices)) > MAX_SPEC_CHARS:
                raise InvalidRequestError(field, f"the choices exceed {MAX_SPEC_CHARS} characters")
        elif self.choices:
            raise InvalidRequestError(field, f"choices are only for kind choice, not {self.kind}")
        if self.strict and self.kind != "json_schema":
            raise InvalidRequestError(field, "strict applies to json_schema only")
