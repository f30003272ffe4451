"""Runtime-tunable conductor settings: SLOs, rejection thresholds, admission mode, policy.

`ConductorSettings` holds one immutable `SettingsValues` snapshot and swaps it atomically
on a change, so a decision reads one consistent snapshot and an SRE change applies to the
next decision without a restart. Every change is validated first — a bad value raises
`InvalidSetting` with the reason and changes nothing, not even the other fields of the same
update — then logged (`logging` plus a typed `SettingChange` in `changes`) and announced to
listeners (metrics, status).

Thresholds are in units of the SLO: a request is rejected when its predicted TTFT exceeds
`prefill_reject_threshold × ttft_slo_s`, or its predicted decode load exceeds
`decode_reject_threshold` (load = predicted TBT / TBT SLO, or KV memory use, whichever is
higher).
"""
from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass, fields, replace
from typing import Any, Callable, Mapping

from conductor.errors import InvalidSetting
from conductor.modes import AdmissionMode, PolicyName, parse_admission, parse_policy

log = logging.getLogger("halfmoon.conductor.settings")


@dataclass(frozen=True, slots=True)
class SettingsValues:
    ttft_slo_s: float = 30.0
    tbt_slo_s: float = 1.0  # the one default (cluster/config.py reads it); GPU-class clusters set ~0.1
    prefill_reject_threshold: float = 1.0
    decode_reject_threshold: float = 1.0
    admission: AdmissionMode = AdmissionMode.EARLY
    policy: PolicyName = PolicyName.COST_AWARE
    typical_output_tokens: int = 256

    def __post_init__(self) -> None:
        for f in fields(self):  # validate, and coerce text ("early", "5") to the field's type
            object.__setattr__(self, f.name, _check(f.name, getattr(self, f.name)))


# name -> (help, parse(text or value) -> value); parse raises ValueError with the reason.
def _positive_float(upper: float) -> Callable[[object], float]:
    def parse(value: object) -> float:
        if isinstance(value, bool):
            raise ValueError("must be a number, not a boolean")
        try:
            number = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise ValueError(f"must be a number, got {value!r}") from None
        if not math.isfinite(number) or number <= 0:
            raise ValueError(f"must be a finite number > 0, got {value!r}")
        if number > upper:
            raise ValueError(f"must be at most {upper:g}, got {number:g}")
        return number

    return parse


def _positive_int(upper: int) -> Callable[[object], int]:
    def parse(value: object) -> int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError(f"must be a whole number, got {value!r}")
        try:
            number = int(value)  # type: ignore[call-overload]
        except (TypeError, ValueError):
            raise ValueError(f"must be a whole number, got {value!r}") from None
        if not 1 <= number <= upper:
            raise ValueError(f"must be between 1 and {upper}, got {number}")
        return number

    return parse


def _enum(parse_text: Callable[[str], object]) -> Callable[[object], object]:
    def parse(value: object) -> object:
        if not isinstance(value, str):
            raise ValueError(f"must be a name, got {value!r}")
        return parse_text(value)

    return parse


SETTINGS_HELP: dict[str, tuple[str, Callable[[object], object]]] = {
    "ttft_slo_s": ("TTFT SLO in seconds", _positive_float(3600.0)),
    "tbt_slo_s": ("TBT SLO in seconds (mean of a request's longest 10% of token gaps)", _positive_float(60.0)),
    "prefill_reject_threshold": ("reject when predicted TTFT > this × TTFT SLO", _positive_float(100.0)),
    "decode_reject_threshold": ("reject when predicted decode load > this (1.0 = at the TBT SLO or KV full)", _positive_float(100.0)),
    "admission": ("admission mode: " + ", ".join(m.value for m in AdmissionMode), _enum(parse_admission)),
    "policy": ("routing policy: " + ", ".join(p.value for p in PolicyName), _enum(parse_policy)),
    "typical_output_tokens": ("output length assumed when a request does not say (predictive admission)", _positive_int(1_000_000)),
}


def _check(name: str, value: object) -> object:
    if name not in SETTINGS_HELP:
        raise InvalidSetting(name, f"no such setting; known: {', '.join(SETTINGS_HELP)}")
    try:
        parsed = SETTINGS_HELP[name][1](value)
    except ValueError as exc:
        raise InvalidSetting(name, str(exc)) from None
    return parsed


@dataclass(frozen=True, slots=True)
class SettingChange:
    at_s: float  # wall-clock time of the change (time.time())
    actor: str
    name: str
    old: str
    new: str


@dataclass(frozen=True, slots=True)
class SettingInfo:
    name: str
    value: str
    help: str


class ConductorSettings:
    """The live, validated settings of one conductor; safe to read from any thread."""

    def __init__(self, values: SettingsValues | None = None, *, clock: Callable[[], float] = time.time) -> None:
        self._values = values if values is not None else SettingsValues()
        self._lock = threading.Lock()
        self._changes: list[SettingChange] = []
        self._listeners: list[Callable[[SettingChange], None]] = []
        self._clock = clock

    @property
    def values(self) -> SettingsValues:
        """The current snapshot; read it once per decision."""
        return self._values

    def get(self, name: str) -> object:
        if name not in SETTINGS_HELP:
            raise InvalidSetting(name, f"no such setting; known: {', '.join(SETTINGS_HELP)}")
        return getattr(self._values, name)

    def describe(self) -> list[SettingInfo]:
        """Every setting with its value (as text) and meaning, for `admin get` and status."""
        v = self._values
        return [SettingInfo(name, _text(getattr(v, name)), help_) for name, (help_, _) in SETTINGS_HELP.items()]

    def set(self, name: str, value: object, *, actor: str = "admin") -> SettingChange | None:
        """Change one setting; None when the value was already in force."""
        changes = self.update({name: value}, actor=actor)
        return changes[0] if changes else None

    def update(self, changes: Mapping[str, object], *, actor: str = "admin") -> list[SettingChange]:
        """Change several settings at once: all are validated before any takes effect."""
        parsed: dict[str, Any] = {name: _check(name, value) for name, value in changes.items()}
        with self._lock:
            old = self._values
            new = replace(old, **parsed)
            now = self._clock()
            done = [
                SettingChange(now, actor, name, _text(getattr(old, name)), _text(getattr(new, name)))
                for name in parsed
                if getattr(old, name) != getattr(new, name)
            ]
            self._values = new
            self._changes.extend(done)
            listeners = list(self._listeners)
        for change in done:
            log.info("setting %s changed %s -> %s by %s", change.name, change.old, change.new, change.actor)
            for listener in listeners:
                listener(change)
        return done

    @property
    def changes(self) -> tuple[SettingChange, ...]:
        return tuple(self._changes)

    def add_listener(self, listener: Callable[[SettingChange], None]) -> None:
        """Call `listener(change)` after each applied change (e.g. to update a metric)."""
        with self._lock:
            self._listeners.append(listener)

    # Convenience read-only attributes.
    @property
    def ttft_slo_s(self) -> float:
        return self._values.ttft_slo_s

    @property
    def tbt_slo_s(self) -> float:
        return self._values.tbt_slo_s

    @property
    def admission(self) -> AdmissionMode:
        return self._values.admission

    @property
    def policy(self) -> PolicyName:
        return self._values.policy


def _text(value: object) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)
