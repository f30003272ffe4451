"""Reading a Mooncake-format request trace into typed records.

One JSON object per line: ``timestamp`` (ms from trace start), ``input_length`` and
``output_length`` (tokens) and ``hash_ids`` (one chained id per trace block of the
prompt, so equal leading ids mean equal prompt prefixes). See
``../shared/traces/README.md``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


class TraceError(ValueError):
    """The trace file is missing or a line does not follow the Mooncake format."""


@dataclass(frozen=True, slots=True)
class TraceRecord:
    """One request of the trace, as recorded."""

    line: int  # 1-based line number in the trace file; a stable request identity
    timestamp_ms: int
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...]

    @property
    def timestamp_s(self) -> float:
        return self.timestamp_ms / 1000.0


_FIELDS = ("timestamp", "input_length", "output_length", "hash_ids")


def parse_record(line_no: int, text: str) -> TraceRecord:
    """Parse one trace line; raise TraceError naming the line on any defect."""
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise TraceError(f"trace line {line_no}: not JSON ({exc.msg})") from exc
    if not isinstance(raw, dict):
        raise TraceError(f"trace line {line_no}: expected a JSON object")
    missing = [name for name in _FIELDS if name not in raw]
    if missing:
        raise TraceError(f"trace line {line_no}: missing field(s) {', '.join(missing)}")
    ints = {name: raw[name] for name in _FIELDS[:3]}
    for name, value in ints.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise TraceError(
                f"trace line {line_no}: {name} must be a non-negative integer, got {value!r}"
            )
    hash_ids = raw["hash_ids"]
    if not isinstance(hash_ids, list) or not all(
        isinstance(h, int) and not isinstance(h, bool) and h >= 0 for h in hash_ids
    ):
        raise TraceError(f"trace line {line_no}: hash_ids must be a list of non-negative integers")
    if ints["input_length"] > 0 and not hash_ids:
        raise TraceError(f"trace line {line_no}: a non-empty prompt needs at least one hash id")
    return TraceRecord(
        line=line_no,
        timestamp_ms=ints["timestamp"],
        input_length=ints["input_length"],
        output_length=ints["output_length"],
        hash_ids=tuple(hash_ids),
    )


def load_trace(path: str | Path) -> list[TraceRecord]:
    """Read every record of a trace file, sorted by timestamp (stable for ties)."""
    path = Path(path)
    if not path.is_file():
        raise TraceError(f"trace file not found: {path}")
    records: list[TraceRecord] = []
    with path.open("r", encoding="utf-8") as handle:
        for line_no, text in enumerate(handle, start=1):
            if text.strip():
                records.append(parse_record(line_no, text))
    if not records:
        raise TraceError(f"trace file {path} holds no requests")
    records.sort(key=lambda record: record.timestamp_ms)
    return records
