"""Conversions between wire messages and the engine's typed records."""
from __future__ import annotations

from engine.errors import InvalidRequestError
from engine.sampling import SamplingParams, show_value
from proto.halfmoon.v1 import common_pb2


def sampling_from_proto(msg: common_pb2.SamplingParams, *, validate: bool = True) -> SamplingParams:
    defaults = SamplingParams()
    p = SamplingParams(
        max_tokens=msg.max_tokens if msg.HasField("max_tokens") else defaults.max_tokens,
        temperature=msg.temperature if msg.HasField("temperature") else defaults.temperature,
        top_p=msg.top_p if msg.HasField("top_p") else defaults.top_p,
        top_k=msg.top_k if msg.HasField("top_k") else defaults.top_k,
        seed=msg.seed if msg.HasField("seed") else None,
        stop=tuple(msg.stop),
        stop_token_ids=tuple(msg.stop_token_ids),
        ignore_eos=msg.ignore_eos,
    )
    if validate:
        try:
            p.validate()
        except InvalidRequestError as e:
            raise InvalidRequestError(f"sampling.{e.field}", e.message) from None
    return p


def sampling_to_proto(p: SamplingParams) -> common_pb2.SamplingParams:
    """The wire form of `p`, as it is (a value `validate` refuses but the message can carry
    travels, for the receiver to refuse). A value the message cannot carry (an integer beyond
    its int32 / int64 field, a string with a lone surrogate, a wrong type) raises
    `InvalidRequestError` naming ``sampling.<field>``, never protobuf's own errors."""
    msg = common_pb2.SamplingParams()
    scalars = [("max_tokens", p.max_tokens), ("temperature", p.temperature), ("top_p", p.top_p),
               ("top_k", p.top_k), ("ignore_eos", p.ignore_eos)]
    if p.seed is not None:
        scalars.append(("seed", p.seed))
    for name, value in scalars:
        try:
            setattr(msg, name, value)
        except (TypeError, ValueError, OverflowError):
            raise InvalidRequestError(f"sampling.{name}", f"cannot be sent as this field's wire type "
                                                          f"({_WIRE_TYPES[name]}), got {show_value(value)}") from None
    for name, values in (("stop", p.stop), ("stop_token_ids", p.stop_token_ids)):
        try:
            if isinstance(values, (str, bytes)):
                raise TypeError
            getattr(msg, name).extend(values)
        except (TypeError, ValueError, OverflowError):  # UnicodeEncodeError is a ValueError
            raise InvalidRequestError(f"sampling.{name}", f"cannot be sent as a list of {_WIRE_TYPES[name]}, "
                                                          f"got {show_value(values)}") from None
    return msg


_WIRE_TYPES = {"max_tokens": "int32", "temperature": "float", "top_p": "float", "top_k": "int32",
               "ignore_eos": "bool", "seed": "int64", "stop": "UTF-8 strings", "stop_token_ids": "int32"}


def unknown_field_numbers(msg) -> list[str]:
    """Dotted paths of fields the sender set that this schema does not know (recursive)."""
    from google.protobuf import unknown_fields

    found = [f"{msg.DESCRIPTOR.name}.#{f.field_number}" for f in unknown_fields.UnknownFieldSet(msg)]
    for desc, value in msg.ListFields():
        if desc.message_type is None or desc.message_type.GetOptions().map_entry:
            continue
        items = value if desc.is_repeated else [value]
        for item in items:
            found += unknown_field_numbers(item)
    return found
