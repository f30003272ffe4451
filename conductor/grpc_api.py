"""The conductor's gRPC services: Generation (clients), Admin (operators) and
ConductorControl (nodes, on the control listener). Errors map to status codes as
`frontend_api` lays out."""
from __future__ import annotations

import logging
import time
import uuid
from dataclasses import fields, replace

import grpc

from conductor.auth import ControlVerifier
from conductor.errors import InvalidSetting
from conductor.frontend_api import (Backend, Finished, GenerateRequest, Rejected, RequestFailed,
                                    SampleEnd, Unavailable)
from conductor.registry import ROLE_CODES, MoveRefused, NodeRegistry
from conductor.settings import ConductorSettings
from conductor.tools import HistoryMessage, ToolCall, ToolSpec, call_constraint, check_tools, parse_calls, render
from engine.errors import InvalidRequestError
from engine.sampling import SamplingParams
from proto.convert import logprob_to_proto, sampling_from_proto, unknown_field_numbers
from proto.halfmoon.v1 import (admin_pb2, admin_pb2_grpc, common_pb2, generate_pb2, generate_pb2_grpc, node_pb2,
                               node_pb2_grpc)

log = logging.getLogger("halfmoon.conductor.grpc")


def request_from_proto(msg: generate_pb2.GenerateRequest) -> GenerateRequest:
    unknown = unknown_field_numbers(msg)
    if unknown:
        raise InvalidRequestError(unknown[0], f"unknown field(s) {', '.join(unknown)}: this server speaks halfmoon.v1")
    params = sampling_from_proto(msg.sampling, validate=False)
    kind = msg.WhichOneof("input")
    if kind is None:
        raise InvalidRequestError("prompt", "give one of prompt, chat, prompt_token_ids")
    use, messages = None, None
    if kind == "chat":
        use, messages, params = _chat_with_tools(msg, params)
    elif msg.tools or msg.HasField("tool_choice"):
        raise InvalidRequestError("tools", "tools are for chat requests")
    return GenerateRequest(
        request_id=msg.request_id,
        sampling=params,
        prompt=msg.prompt if kind == "prompt" else None,
        messages=messages,
        prompt_token_ids=tuple(msg.prompt_token_ids.ids) if kind == "prompt_token_ids" else None,
        tool_use=use,
    )


_ROLES = ("system", "user", "assistant", "tool")


def _chat_with_tools(msg: generate_pb2.GenerateRequest, params: SamplingParams):
    """The chat's turns rendered for the template (tool turns, assistant calls, offered tools)
    and, for a required or named call, the constraint on the output (`conductor.tools`)."""
    history = []
    for i, m in enumerate(msg.chat.messages):
        if m.role not in _ROLES:
            raise InvalidRequestError(f"chat.messages[{i}].role", f"must be one of {', '.join(_ROLES)}, got {m.role!r}")
        if m.role == "tool" and not m.tool_call_id:
            raise InvalidRequestError(f"chat.messages[{i}].tool_call_id", "is required in a tool message")
        if m.tool_calls and m.role != "assistant":
            raise InvalidRequestError(f"chat.messages[{i}].tool_calls", "only an assistant message calls tools")
        history.append(HistoryMessage(m.role, m.content, tuple(ToolCall(c.id, c.name, c.arguments)
                                                                for c in m.tool_calls),
                                      m.tool_call_id or None, m.name or None))
    use = None
    if msg.tools or msg.HasField("tool_choice"):
        specs = tuple(ToolSpec(t.name, t.description, t.parameters or '{"type": "object", "properties": {}}')
                      for t in msg.tools)
        choice = msg.tool_choice.WhichOneof("choice")
        use = check_tools(specs, msg.tool_choice.mode if choice == "mode" else None,
                          msg.tool_choice.function if choice == "function" else None, field="tool_choice")
        forced = call_constraint(use)
        if forced is not None:
            if params.constraint is not None:
                raise InvalidRequestError("tool_choice", f"{params.constraint.source} and a required tool call "
                                                         "cannot both constrain the output")
            params = replace(params, constraint=forced)
    return use, render(history, use), params


_SAMPLING_FIELDS = frozenset(f.name for f in fields(SamplingParams))


def _grpc_field(name: str) -> str:
    """A field as the intake names it (HTTP's names) -> its path in `GenerateRequest`."""
    head = name.split(".")[0].split("[")[0]
    if head in _SAMPLING_FIELDS:
        return f"sampling.{name}"
    if head == "messages":
        return f"chat.{name}"
    return "prompt_token_ids.ids" if name == "prompt_token_ids" else name


def _sample_ends(item: Finished, texts: dict[int, str], req: GenerateRequest) -> list[generate_pb2.SampleEnd]:
    """Every sample's end (one for n == 1), with the tool calls parsed from its text."""
    ends = item.samples or (SampleEnd(0, item.finish_reason, item.usage.completion_tokens),)
    out = []
    for e in ends:
        end = generate_pb2.SampleEnd(index=e.index, finish_reason=e.finish_reason, completion_tokens=e.completion_tokens)
        use = req.tool_use
        if use is not None and use.offered:
            content, calls = parse_calls(texts.get(e.index, ""), use)
            end.content = content or ""
            end.tool_calls.extend(generate_pb2.ToolCall(id=c.id, name=c.name, arguments=c.arguments) for c in calls)
            if calls and e.finish_reason == "stop":
                end.finish_reason = "tool_calls"
        out.append(end)
    return out


class GenerationService(generate_pb2_grpc.GenerationServicer):
    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    async def Generate(self, request, context: grpc.aio.ServicerContext):
        stream = None
        try:
            req = request_from_proto(request)
            if not req.request_id:
                req = replace(req, request_id=uuid.uuid4().hex)
            stream = self.backend.generate(req)
            texts: dict[int, str] = {}  # each sample's text, for its tool calls
            async for item in stream:
                if isinstance(item, Finished):
                    t = item.timing
                    yield generate_pb2.GenerateResponse(final=generate_pb2.Final(
                        request_id=req.request_id, finish_reason=item.finish_reason,
                        usage=common_pb2.Usage(prompt_tokens=item.usage.prompt_tokens,
                                               completion_tokens=item.usage.completion_tokens,
                                               cached_tokens=item.usage.cached_tokens),
                        timing=common_pb2.Timing(queue_s=t.queue_s, prefill_s=t.prefill_s,
                                                 kv_transfer_s=t.kv_transfer_s, first_decode_s=t.first_decode_s,
                                                 ttft_s=t.ttft_s),
                        prefill_node=item.prefill_node, decode_node=item.decode_node,
                        samples=_sample_ends(item, texts, req)))
                else:
                    texts[item.index] = texts.get(item.index, "") + item.text
                    yield generate_pb2.GenerateResponse(delta=common_pb2.TokenDelta(
                        text=item.text, token_ids=list(item.token_ids), index=item.index,
                        logprobs=[logprob_to_proto(lp) for lp in item.logprobs],
                        finish_reason=item.finish_reason or ""))
        except InvalidRequestError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{_grpc_field(e.field)}: {e.message}")
        except Rejected as e:
            context.set_trailing_metadata((("retry-after-s", f"{e.retry_after_s:.3f}"),))
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"rejected: {e.reason}")
        except Unavailable as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        except RequestFailed as e:
            await context.abort(grpc.StatusCode.ABORTED, str(e))
        except Exception:  # a bug: say so without a Python class name; the log has the rest
            ref = uuid.uuid4().hex[:12]
            log.exception("unexpected error in Generate (reference %s)", ref)
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error (reference {ref} in the conductor's log)")
        finally:
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()  # at once, not when collected: closing is how a request aborts


class AdminService(admin_pb2_grpc.AdminServicer):
    def __init__(self, settings: ConductorSettings, registry: NodeRegistry, model_name: str) -> None:
        self.settings = settings
        self.registry = registry
        self.model_name = model_name

    def _settings(self) -> list[admin_pb2.Setting]:
        return [admin_pb2.Setting(name=i.name, value=str(i.value), description=i.help)
                for i in self.settings.describe()]

    async def Status(self, request, context):
        now = time.monotonic()
        nodes = []
        for rec in self.registry.nodes.values():
            ld = rec.load
            nodes.append(admin_pb2.NodeStatus(
                node_id=rec.node_id, role=rec.role, address=rec.address, state="up" if rec.up else "down",
                running=ld.running, waiting=ld.waiting, kv_blocks_used=rec.layout.total_blocks - ld.free_blocks,
                kv_blocks_total=rec.layout.total_blocks, prefix_queries_tokens=ld.prefix_queries_tokens,
                prefix_hits_tokens=ld.prefix_hits_tokens, last_heartbeat_age_s=now - rec.last_seen,
                metrics_address=rec.metrics_address, tiers=list(ld.tiers),
                gpu=ld.gpu if ld.HasField("gpu") else None))
        return admin_pb2.StatusResponse(nodes=nodes, settings=self._settings(), model=self.model_name)

    async def GetSettings(self, request, context):
        return admin_pb2.GetSettingsResponse(settings=self._settings())

    async def MoveNode(self, request, context):
        try:
            old, drained_s, switched_s = await self.registry.move(request.node_id, request.role,
                                                                  timeout_s=request.timeout_s or 120.0)
        except (ValueError, LookupError) as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e).strip("'\""))
        except MoveRefused as e:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
        except TimeoutError as e:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, str(e))
        log.info("%s moved node %s: %s -> %s", request.actor or "admin", request.node_id, old, request.role)
        return admin_pb2.MoveNodeResponse(node_id=request.node_id, from_role=old, role=request.role,
                                          drained_s=drained_s, switched_s=switched_s)

    async def SetSettings(self, request, context):
        try:
            changes = self.settings.update(dict(request.values), actor=request.actor or "admin")
        except InvalidSetting as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        return admin_pb2.SetSettingsResponse(settings=self._settings(), changed=[c.name for c in changes])


class ControlService(node_pb2_grpc.ConductorControlServicer):
    """Nodes' Register / Heartbeat, on the conductor's control listener; every call must be
    signed with the cluster's control secret (`conductor.auth`), else UNAUTHENTICATED."""

    def __init__(self, registry: NodeRegistry, verifier: ControlVerifier) -> None:
        self.registry = registry
        self.verifier = verifier

    async def _authenticate(self, method: str, request, context) -> None:
        problem = self.verifier.check(method, request, context.invocation_metadata())
        if problem is not None:
            log.warning("refused %s of node %r from %s: %s", method, request.node_id, context.peer(), problem)
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, f"control plane: {problem}")

    async def Register(self, request, context):
        await self._authenticate("Register", request, context)
        try:
            await self.registry.register(request)
        except ValueError as e:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
        return node_pb2.RegisterResponse(heartbeat_interval_s=self.registry.heartbeat_interval_s)

    async def Heartbeat(self, request, context):
        await self._authenticate("Heartbeat", request, context)
        known = self.registry.heartbeat(request)
        switch = self.registry.take_switch(request.node_id) if known else ""
        return node_pb2.HeartbeatResponse(known=known, switch_role=ROLE_CODES.get(switch, node_pb2.ROLE_UNSPECIFIED))
