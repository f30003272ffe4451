"""The replayer's client for a live cluster: the conductor's gRPC API (`halfmoon.v1`)."""
from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import grpc

from bench.replay.client import PREFIX_CACHE_HITS, PREFIX_CACHE_QUERIES, Rejected, RequestFailed, StreamEvent
from proto.halfmoon.v1 import admin_pb2, admin_pb2_grpc, common_pb2, generate_pb2, generate_pb2_grpc


class GrpcReplayClient:
    """Greedy, EOS-ignoring requests by token ids, so `max_tokens` is the answer length."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._channel = grpc.aio.insecure_channel(address)
        self._gen = generate_pb2_grpc.GenerationStub(self._channel)
        self._admin = admin_pb2_grpc.AdminStub(self._channel)

    async def check(self, timeout_s: float = 5.0) -> None:
        """Fail fast, with the address, if no conductor answers."""
        try:
            await self._admin.Status(admin_pb2.StatusRequest(), timeout=timeout_s)
        except grpc.aio.AioRpcError as e:
            raise RequestFailed(f"no conductor at {self.address}: {e.code().name}: {e.details()}") from None

    async def generate(self, request_id: str, prompt_token_ids: list[int], max_tokens: int
                       ) -> AsyncIterator[StreamEvent]:
        req = generate_pb2.GenerateRequest(
            request_id=f"{request_id}-{uuid.uuid4().hex[:8]}",  # unique even if a sweep reuses ids
            prompt_token_ids=generate_pb2.TokenIds(ids=prompt_token_ids),
            sampling=common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
        call = self._gen.Generate(req)
        try:
            async for msg in call:
                if msg.HasField("delta") and msg.delta.token_ids:
                    yield StreamEvent(tuple(msg.delta.token_ids))
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                retry = dict(e.trailing_metadata() or ()).get("retry-after-s")
                raise Rejected(e.details(), float(retry) if retry else None) from None
            raise RequestFailed(f"{e.code().name}: {e.details()}") from None
        finally:
            call.cancel()

    async def node_metrics(self) -> dict[str, float]:
        try:
            st = await self._admin.Status(admin_pb2.StatusRequest(), timeout=5)
        except grpc.aio.AioRpcError as e:
            raise RequestFailed(f"cluster status: {e.code().name}: {e.details()}") from None
        return {PREFIX_CACHE_HITS: float(sum(n.prefix_hits_tokens for n in st.nodes)),
                PREFIX_CACHE_QUERIES: float(sum(n.prefix_queries_tokens for n in st.nodes))}

    async def close(self) -> None:
        await self._channel.close()
