"""Records of the compiled simulator core whose `__init__` is written out by hand.

A dataclass compiled with mypyc keeps the `__init__` the dataclasses module generates, and
that one runs interpreted (a frozen record's costs about 1 µs; written out and compiled,
0.07 µs), so the records built per request or per decision are `init=False` with the
initialiser spelled out. These tests hold each written-out `__init__` to its fields: same
names in the same order, the same defaults, every field set, and a frozen record stays
frozen, so a field added to the class but not to its `__init__` fails here."""
from __future__ import annotations

import dataclasses
import importlib
import inspect

import pytest

from bench.sim import native


def _written_out() -> list[type]:
    found = []
    for name in native.MODULES:
        module = importlib.import_module(name)
        for obj in vars(module).values():
            if (isinstance(obj, type) and obj.__module__ == name and dataclasses.is_dataclass(obj)
                    and not obj.__dataclass_params__.init):
                found.append(obj)
    return found


RECORDS = _written_out()


def test_the_records_built_per_request_have_their_init_written_out():
    names = {cls.__name__ for cls in RECORDS}
    assert {"SimRequest", "RequestInfo", "Decision", "PrefillChoice", "DecodeChoice", "Rejection", "Tracked",
            "DecodeResident", "KVEvent", "DecodeSteps", "PredictionRecord"} <= names


@pytest.mark.parametrize("cls", RECORDS, ids=lambda c: c.__name__)
def test_init_takes_the_fields_in_order_with_their_defaults(cls):
    fields = dataclasses.fields(cls)
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    assert [p.name for p in params] == [f.name for f in fields]
    for p, f in zip(params, fields):
        assert p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD, p
        assert f.default_factory is dataclasses.MISSING, f"{cls.__name__}.{f.name}: a factory needs its own code"
        expected = inspect.Parameter.empty if f.default is dataclasses.MISSING else f.default
        assert p.default == expected, f"{cls.__name__}.{f.name}: default {p.default!r}, field {expected!r}"


class _Mark:
    """A value no default equals, one per field."""

    def __init__(self, i: int) -> None:
        self.i = i


@pytest.mark.parametrize("cls", RECORDS, ids=lambda c: c.__name__)
def test_init_sets_every_field_from_its_argument(cls, monkeypatch):
    fields = dataclasses.fields(cls)
    if hasattr(cls, "__post_init__"):  # (its checks need real values; the assignment is what is tested)
        monkeypatch.setattr(cls, "__post_init__", lambda self: None)
    marks = [_Mark(i) for i in range(len(fields))]
    by_position = cls(*marks)
    by_keyword = cls(**{f.name: m for f, m in zip(fields, marks)})
    for f, m in zip(fields, marks):
        assert getattr(by_position, f.name) is m and getattr(by_keyword, f.name) is m
    assert by_position == by_keyword
    if cls.__dataclass_params__.frozen:
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(by_position, fields[0].name, 1)
    other = _Mark(-1)
    changed = dataclasses.replace(by_position, **{fields[-1].name: other})
    assert getattr(changed, fields[-1].name) is other and getattr(changed, fields[0].name) is marks[0]


def test_request_info_still_checks_its_lengths():
    from conductor.request import RequestInfo

    with pytest.raises(ValueError, match="input_tokens must be >= 1"):
        RequestInfo("r", 0, ())
