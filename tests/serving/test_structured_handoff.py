"""Structured output across the prefill -> decode handoff, in one process (tiny random-weight
model: only the grammar keeps its output in shape, so a handoff that loses the grammar's
state shows at once). The prefill node samples the first token under the grammar; the decode
node rebuilds the matcher and advances it by that token (and by every parallel sample's), or
recomputes the prompt itself when the KV transfer failed."""
from __future__ import annotations

import json
import time

import grpc
import jsonschema
import pytest

from cluster.client import Client, make_request
from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.request import sample_id
from engine.sampling import SamplingParams
from engine.structured import Constraint

PROMPT = [1, 504, 3458, 314, 253, 1178, 28, 30, 1173, 42, 5400, 17, 288, 77, 91, 300, 12, 9]  # 18 tokens
# The first tokens are forced: '{"label": "' comes out whatever the model wants. A decode node
# that did not advance its matcher by the first token would force them a second time.
SCHEMA = {"type": "object",
          "properties": {"label": {"enum": ["north", "south", "east", "west"]},
                         "steps": {"type": "integer", "minimum": 1, "maximum": 9},
                         "flags": {"type": "array", "items": {"type": "boolean"}, "minItems": 1, "maxItems": 2}},
          "required": ["label", "steps", "flags"], "additionalProperties": False}
SETTINGS = {"ttft_slo_s": 600.0, "tbt_slo_s": 60.0, "admission": "none"}
CASES = [
    SamplingParams(max_tokens=60, constraint=Constraint.json_schema(SCHEMA)),
    SamplingParams(max_tokens=60, temperature=1.0, seed=3, constraint=Constraint.json_schema(SCHEMA)),
    SamplingParams(max_tokens=30, temperature=1.5, seed=4, constraint=Constraint("regex", "[a-z]{2,6}-[0-9]{2}")),
    SamplingParams(max_tokens=30, temperature=1.0, seed=5, constraint=Constraint("choice", choices=("up", "down"))),
    SamplingParams(max_tokens=60, temperature=1.0, seed=6, logprobs=2, constraint=Constraint.json_schema(SCHEMA)),
]


def local_run(eng: LLMEngine, params: SamplingParams) -> dict[int, list[int]]:
    eng.add_request("x", params, prompt_token_ids=PROMPT)
    out: dict[int, list[int]] = {}
    while eng.has_unfinished():
        for o in eng.step():
            out.setdefault(o.index, []).extend(o.new_token_ids)
    return out


def cluster_run(client: Client, params: SamplingParams) -> tuple[dict[int, list[int]], dict[int, str], object, list]:
    toks: dict[int, list[int]] = {}
    text: dict[int, str] = {}
    final, deltas = None, []
    for msg in client.stream(make_request(token_ids=PROMPT, params=params), timeout=120):
        if msg.HasField("delta"):
            deltas.append(msg.delta)
            toks.setdefault(msg.delta.index, []).extend(msg.delta.token_ids)
            text[msg.delta.index] = text.get(msg.delta.index, "") + msg.delta.text
        else:
            final = msg.final
    return toks, text, final, deltas


def wait_idle(client: Client, timeout: float = 30.0) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    while True:
        used = {n.node_id: n.kv_blocks_used for n in client.status().nodes}
        if all(v == 0 for v in used.values()) or time.monotonic() > deadline:
            return used
        time.sleep(0.3)


@pytest.fixture(scope="module")
def local(tiny_model_dir) -> LLMEngine:
    return LLMEngine(tiny_model_dir, EngineConfig(num_blocks=256))


def check(params: SamplingParams, text: str) -> None:
    c = params.constraint
    if c.kind == "json_schema":
        jsonschema.validate(json.loads(text), SCHEMA)
    elif c.kind == "regex":
        import re
        assert re.fullmatch(c.spec, text), text
    else:
        assert text in c.choices


def test_constrained_requests_through_prefill_and_decode_match_one_engine(tiny_model_dir, in_process_cluster, local):
    cluster = in_process_cluster(1, 1, settings=SETTINGS, model=str(tiny_model_dir), max_model_len=1024)
    with Client(cluster.address) as c:
        for params in CASES:
            want = local_run(local, params)
            toks, text, final, deltas = cluster_run(c, params)
            assert toks == want, params
            check(params, text[0])
            assert final.finish_reason == "stop"
            if params.logprobs is not None:  # the first token's logprob came from the prefill node
                lps = [lp for d in deltas for lp in d.logprobs]
                assert [lp.token_id for lp in lps] == toks[0] and all(len(lp.top) == 2 for lp in lps)
        assert wait_idle(c) == {n: 0 for n in wait_idle(c)}


def test_parallel_samples_fork_on_the_decode_node_and_the_prompt_is_computed_once(tiny_model_dir, in_process_cluster,
                                                                                   local):
    params = SamplingParams(max_tokens=60, temperature=1.2, seed=9, n=4, constraint=Constraint.json_schema(SCHEMA))
    want = local_run(local, params)
    cluster = in_process_cluster(1, 1, settings=SETTINGS, model=str(tiny_model_dir), max_model_len=1024)
    with Client(cluster.address) as c:
        before = {n.node_id: n.prefix_queries_tokens for n in c.status().nodes}
        toks, text, final, deltas = cluster_run(c, params)
        assert toks == want and sorted(toks) == [0, 1, 2, 3]
        for i in range(4):
            check(params, text[i])
        assert [s.index for s in final.samples] == [0, 1, 2, 3] and all(s.finish_reason == "stop" for s in final.samples)
        assert final.usage.prompt_tokens == len(PROMPT)
        assert final.usage.completion_tokens == sum(len(t) for t in toks.values())
        assert sum(1 for d in deltas if d.finish_reason) == 4  # each sample's end is marked
        time.sleep(1.2)  # a heartbeat brings the nodes' prefix counters
        after = {n.node_id: n.prefix_queries_tokens for n in c.status().nodes}
        looked_up = {k: after[k] - before[k] for k in after}
        roles = {n.node_id: n.role for n in c.status().nodes}
        # the prefill node admitted the prompt once (one lookup of its tokens); the decode node none
        assert sorted((roles[k], v) for k, v in looked_up.items()) == [("decode", 0), ("prefill", len(PROMPT))]
        assert wait_idle(c) == {n: 0 for n in roles}


def test_failed_kv_transfer_recomputes_under_the_grammar(tiny_model_dir, in_process_cluster, local, monkeypatch):
    monkeypatch.setenv("HALFMOON_TRANSFER_FAULTS", "fail=1.0,seed=1")
    cluster = in_process_cluster(1, 1, settings=SETTINGS, model=str(tiny_model_dir), max_model_len=1024)
    with Client(cluster.address) as c:
        for params in CASES[:2]:
            toks, text, final, _ = cluster_run(c, params)
            assert toks == local_run(local, params)
            check(params, text[0])
        assert wait_idle(c) == {n.node_id: 0 for n in c.status().nodes}


def test_a_bad_constraint_is_refused_before_any_prefill_work(tiny_model_dir, in_process_cluster):
    cluster = in_process_cluster(1, 1, settings=SETTINGS, model=str(tiny_model_dir), max_model_len=1024)
    with Client(cluster.address) as c:
        before = [n.prefix_queries_tokens for n in c.status().nodes]
        bad = [
            (SamplingParams(constraint=Constraint("regex", r"[^\s\S]")), "sampling.regex: the regex matches nothing"),
            (SamplingParams(constraint=Constraint.json_schema({"type": "nope"})), "sampling.json_schema.schema: does not compile"),
            (SamplingParams(constraint=Constraint("grammar", "start: nothing_here")), "sampling.grammar: does not compile"),
            (SamplingParams(n=17), "sampling.n: at most 16"),
            (SamplingParams(logit_bias=((10**6, 1.0),)), "sampling.logit_bias: token id 1000000 outside"),
        ]
        for params, message in bad:
            with pytest.raises(grpc.RpcError) as e:
                c.generate(make_request(token_ids=PROMPT, params=params), timeout=30)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert e.value.details().startswith(message), e.value.details()
        time.sleep(1.2)
        assert [n.prefix_queries_tokens for n in c.status().nodes] == before


def test_grpc_tool_choice_required_gives_a_declared_call_with_valid_arguments(tiny_model_dir, in_process_cluster):
    from proto.convert import sampling_to_proto
    from proto.halfmoon.v1 import generate_pb2

    params = {"get_weather": {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
                              "properties": {"city": {"enum": ["Paris", "Oslo"]}, "unit": {"enum": ["c", "f"]}}},
              "add": {"type": "object", "additionalProperties": False, "required": ["a", "b"],
                      "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                     "b": {"type": "integer", "minimum": 0, "maximum": 99}}}}
    cluster = in_process_cluster(1, 1, settings=SETTINGS, model=str(tiny_model_dir), max_model_len=1024)
    with Client(cluster.address) as c:
        for seed, choice in ((1, generate_pb2.ToolChoice(mode="required")), (2, generate_pb2.ToolChoice(mode="required")),
                             (3, generate_pb2.ToolChoice(function="add"))):
            req = generate_pb2.GenerateRequest(
                chat=generate_pb2.ChatMessages(messages=[
                    generate_pb2.ChatMessage(role="user", content="Weather in Paris?"),
                    generate_pb2.ChatMessage(role="assistant", tool_calls=[generate_pb2.ToolCall(
                        id="call_0", name="get_weather", arguments='{"city": "Oslo", "unit": "c"}')]),
                    generate_pb2.ChatMessage(role="tool", tool_call_id="call_0", content='{"temp": 3}'),
                    generate_pb2.ChatMessage(role="user", content="And now?")]),
                sampling=sampling_to_proto(SamplingParams(max_tokens=60, temperature=1.0, seed=seed)),
                tools=[generate_pb2.Tool(name=n, parameters=json.dumps(p)) for n, p in params.items()],
                tool_choice=choice)
            res = c.generate(req, timeout=120)
            (end,) = res.final.samples
            assert end.finish_reason == "tool_calls", (res.text, end)
            (call,) = end.tool_calls
            assert call.id.startswith("call_") and (choice.function in ("", call.name))
            jsonschema.validate(json.loads(call.arguments), params[call.name])
        with pytest.raises(grpc.RpcError) as e:
            c.generate(generate_pb2.GenerateRequest(
                chat=generate_pb2.ChatMessages(messages=[generate_pb2.ChatMessage(role="user", content="x")]),
                tools=[generate_pb2.Tool(name="add", parameters="{}")], tool_choice=generate_pb2.ToolChoice(function="sub")))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert e.value.details().startswith("tool_choice.function.name: 'sub' is not one of the declared tools")
