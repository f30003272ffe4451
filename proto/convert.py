"""Conversions between wire messages and the engine's typed records."""
from __future__ import annotations

from engine.block_pool import CLEARED, REMOVED, STORED, KVEvent
from engine.errors import InvalidRequestError
from engine.logprobs import TokenLogprob
from engine.sampling import SamplingParams, show_value
from engine.structured import Constraint
from proto.halfmoon.v1 import common_pb2, node_pb2


def constraint_from_proto(msg: common_pb2.SamplingParams) -> Constraint | None:
    kind = msg.WhichOneof("constraint")
    if kind is None:
        return None
    if kind == "json_object":
        return Constraint("json_object", source="sampling.json_object")
    if kind == "json_schema":
        return Constraint("json_schema", msg.json_schema.schema, strict=msg.json_schema.strict,
                          source="sampling.json_schema.schema")
    if kind == "choice":
        return Constraint("choice", choices=tuple(msg.choice.choices), source="sampling.choice.choices")
    return Constraint(kind, getattr(msg, kind), source=f"sampling.{kind}")  # regex | grammar


def _constraint_to_proto(c: Constraint, msg: common_pb2.SamplingParams) -> None:
    try:
        if c.kind == "json_object":
            msg.json_object.SetInParent()
        elif c.kind == "json_schema":
            msg.json_schema.schema = c.spec
            msg.json_schema.strict = c.strict
        elif c.kind == "choice":
            msg.choice.choices.extend(c.choices)
        elif c.kind in ("regex", "grammar"):
            setattr(msg, c.kind, c.spec)
        else:
            raise InvalidRequestError("sampling.constraint", f"unknown kind {show_value(c.kind)}")
    except (TypeError, ValueError) as e:
        if isinstance(e, InvalidRequestError):
            raise
        raise InvalidRequestError("sampling.constraint", "cannot be sent: its text must be valid Unicode") from None


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
        n=msg.n if msg.HasField("n") else defaults.n,
        logprobs=msg.logprobs if msg.HasField("logprobs") else None,
        presence_penalty=msg.presence_penalty if msg.HasField("presence_penalty") else defaults.presence_penalty,
        frequency_penalty=msg.frequency_penalty if msg.HasField("frequency_penalty") else defaults.frequency_penalty,
        repetition_penalty=(msg.repetition_penalty if msg.HasField("repetition_penalty")
                            else defaults.repetition_penalty),
        logit_bias=tuple(sorted(msg.logit_bias.items())),
        constraint=constraint_from_proto(msg),
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
    if p.n != 1:
        scalars.append(("n", p.n))
    if p.logprobs is not None:
        scalars.append(("logprobs", p.logprobs))
    for name, neutral in (("presence_penalty", 0), ("frequency_penalty", 0), ("repetition_penalty", 1)):
        if getattr(p, name) != neutral:
            scalars.append((name, getattr(p, name)))
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
    try:
        for tid, bias in p.logit_bias:
            msg.logit_bias[tid] = bias
    except (TypeError, ValueError, OverflowError):
        raise InvalidRequestError("sampling.logit_bias", f"cannot be sent as int32 -> float pairs, "
                                                         f"got {show_value(p.logit_bias)}") from None
    if p.constraint is not None:
        _constraint_to_proto(p.constraint, msg)
    return msg


_WIRE_TYPES = {"max_tokens": "int32", "temperature": "float", "top_p": "float", "top_k": "int32",
               "ignore_eos": "bool", "seed": "int64", "stop": "UTF-8 strings", "stop_token_ids": "int32",
               "n": "int32", "logprobs": "int32", "presence_penalty": "float", "frequency_penalty": "float",
               "repetition_penalty": "float"}


def logprob_to_proto(lp: TokenLogprob) -> common_pb2.TokenLogprob:
    return common_pb2.TokenLogprob(token_id=lp.token_id, logprob=lp.logprob,
                                   top=[common_pb2.TopLogprob(token_id=t, logprob=v) for t, v in lp.top])


def logprob_from_proto(msg: common_pb2.TokenLogprob) -> TokenLogprob:
    return TokenLogprob(msg.token_id, msg.logprob, tuple((t.token_id, t.logprob) for t in msg.top))


_KV_KINDS = {STORED: node_pb2.KV_EVENT_STORED, REMOVED: node_pb2.KV_EVENT_REMOVED,
             CLEARED: node_pb2.KV_EVENT_CLEARED}
_KV_KIND_NAMES = {v: k for k, v in _KV_KINDS.items()}


def kv_event_to_proto(ev: KVEvent) -> node_pb2.KVEvent:
    """The wire form of a KV event; the node is the stream's (a subscription is to one node)."""
    msg = node_pb2.KVEvent(seq=ev.seq, kind=_KV_KINDS[ev.kind], block_hashes=ev.block_hashes,
                           tier="" if ev.tier == "device" else ev.tier)
    if ev.parent_hash is not None:
        msg.parent_hash = ev.parent_hash
    return msg


def kv_event_from_proto(msg: node_pb2.KVEvent, node: str) -> KVEvent:
    """A KV event received on `node`'s stream. ValueError for a kind this code does not know."""
    kind = _KV_KIND_NAMES.get(msg.kind)
    if kind is None:
        raise ValueError(f"KV event {msg.seq} from {node}: unknown kind {msg.kind}")
    return KVEvent(kind, tuple(msg.block_hashes), msg.parent_hash if msg.HasField("parent_hash") else None,
                   msg.tier or "device", msg.seq, node)


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
