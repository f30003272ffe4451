"""A small synchronous gRPC client for the conductor (used by the CLI and tests)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Iterator

from conductor.auth import API_KEY_ENV, keyed_channel
from engine.sampling import SamplingParams
from proto.convert import sampling_to_proto
from proto.halfmoon.v1 import admin_pb2, admin_pb2_grpc, generate_pb2, generate_pb2_grpc


@dataclass
class Result:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    final: generate_pb2.Final | None = None


def make_request(prompt: str | None = None, *, chat: list[tuple[str, str]] | None = None,
                 token_ids: list[int] | None = None, params: SamplingParams | None = None,
                 request_id: str = "") -> generate_pb2.GenerateRequest:
    req = generate_pb2.GenerateRequest(request_id=request_id, sampling=sampling_to_proto(params or SamplingParams()))
    if chat is not None:
        req.chat.CopyFrom(generate_pb2.ChatMessages(
            messages=[generate_pb2.ChatMessage(role=r, content=c) for r, c in chat]))
    elif token_ids is not None:
        req.prompt_token_ids.CopyFrom(generate_pb2.TokenIds(ids=token_ids))
    else:
        req.prompt = prompt or ""
    return req


class Client:
    """`api_key`: sent with every call (None: $HALFMOON_API_KEY if set, else no key)."""

    def __init__(self, address: str = "127.0.0.1:50051", api_key: str | None = None) -> None:
        self.address = address
        self.channel = keyed_channel(address, api_key if api_key is not None else os.environ.get(API_KEY_ENV))
        self.gen = generate_pb2_grpc.GenerationStub(self.channel)
        self.admin = admin_pb2_grpc.AdminStub(self.channel)

    def stream(self, req: generate_pb2.GenerateRequest, timeout: float | None = 300) -> Iterator[generate_pb2.GenerateResponse]:
        return self.gen.Generate(req, timeout=timeout)

    def generate(self, req: generate_pb2.GenerateRequest, timeout: float | None = 300) -> Result:
        res = Result()
        for msg in self.stream(req, timeout):
            if msg.HasField("delta"):
                res.text += msg.delta.text
                res.token_ids += list(msg.delta.token_ids)
            else:
                res.final = msg.final
        return res

    def status(self, timeout: float = 5) -> admin_pb2.StatusResponse:
        return self.admin.Status(admin_pb2.StatusRequest(), timeout=timeout)

    def set_settings(self, values: dict[str, str], actor: str = "cli") -> admin_pb2.SetSettingsResponse:
        return self.admin.SetSettings(admin_pb2.SetSettingsRequest(values=values, actor=actor), timeout=5)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
