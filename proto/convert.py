"""Conversions between wire messages and the engine's typed records."""
from __future__ import annotations

from engine.errors import InvalidRequestError
from engine.sampling import SamplingParams
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
    msg = common_pb2.SamplingParams(max_tokens=p.max_tokens, temperature=p.temperature, top_p=p.top_p,
                                    top_k=p.top_k, stop=list(p.stop), stop_token_ids=list(p.stop_token_ids),
                                    ignore_eos=p.ignore_eos)
    if p.seed is not None:
        msg.seed = p.seed
    return msg


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
