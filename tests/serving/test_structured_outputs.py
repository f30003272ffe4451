"""Structured output on the real model, in one engine and through a disaggregated cluster
(1 prefill + 1 decode node, in process): every JSON-schema output parses and validates
(greedy and sampled; greedy identical both ways), regex and choice outputs match, a required
tool call parses to a declared function with valid arguments, logprobs equal Hugging Face's
log-softmax to 1e-4, and n=4 computes the prompt once."""
from __future__ import annotations

import json
import re
import socket
import threading
import time

import jsonschema
import openai
import pytest
import torch

from bench.structured_schemas import all_schemas
from cluster.client import Client, make_request
from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.errors import InvalidRequestError
from engine.sampling import SamplingParams
from engine.structured import Constraint
from engine.tokenizer import Message

pytestmark = [pytest.mark.slow, pytest.mark.real_model]

SETTINGS = {"ttft_slo_s": 600.0, "tbt_slo_s": 60.0, "admission": "none"}
MAX_TOKENS = 256


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def local(real_model_dir) -> LLMEngine:
    return LLMEngine(real_model_dir, EngineConfig(num_blocks=1024, max_num_seqs=64))


@pytest.fixture(scope="module")
def cases(local):
    """Every schema of the set the backend accepts in strict mode (where it enforces every
    keyword; `bench.structured` also reports the lenient rest, best effort)."""
    out = []
    for case in all_schemas():
        if not python_checkable(json.loads(case.validate_against)):
            continue
        c = Constraint("json_schema", case.schema, strict=True)
        try:
            local.check_params(SamplingParams(constraint=c))
        except InvalidRequestError:
            continue
        out.append((case, c))
    return out


def python_checkable(schema) -> bool:
    """`jsonschema` can judge documents under it: the schema checks against its metaschema
    and Python's `re` compiles its patterns (one with ECMA-only classes like \\p{Cc} cannot)."""
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError:
        return False
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "pattern" and isinstance(value, str):
                    try:
                        re.compile(value)
                    except re.error:
                        return False
                stack.append(value)
        elif isinstance(node, list):
            stack.extend(node)
    return True


def run_local(eng: LLMEngine, jobs: dict[str, tuple[SamplingParams, list[Message]]]) -> dict[str, list[int]]:
    for rid, (params, msgs) in jobs.items():
        eng.add_request(rid, params, messages=msgs)
    out: dict[str, list[int]] = {rid: [] for rid in jobs}
    while eng.has_unfinished():
        for o in eng.step():
            out[o.request_id] += o.new_token_ids
    return out


def run_cluster(address: str, jobs: dict[str, tuple[SamplingParams, list[Message]]]) -> dict[str, object]:
    """Every job at once (the decode node batches them), each on its own thread."""
    results: dict[str, object] = {}
    with Client(address) as c:
        def one(rid: str) -> None:
            params, msgs = jobs[rid]
            try:
                results[rid] = c.generate(make_request(chat=[(m.role, m.content) for m in msgs], params=params),
                                          timeout=1200)
            except Exception as e:  # recorded, asserted by the caller
                results[rid] = e

        threads = [threading.Thread(target=one, args=(rid,)) for rid in jobs]
        for t in threads:
            t.start()
        for t in threads:
            t.join(1300)
    return results


def valid(case, text: str) -> str | None:
    """None if `text` is a document valid under the schema as shipped, else why not."""
    try:
        jsonschema.validate(json.loads(text), json.loads(case.validate_against), format_checker=jsonschema.FormatChecker())
    except (ValueError, jsonschema.ValidationError) as e:
        return f"{case.name}: {str(e)[:200]} in {text[:200]!r}"
    return None


@pytest.mark.timeout(3600)  # four runs of ~31 documents of up to 256 tokens, on a loaded CPU
def test_json_schemas_validate_in_one_engine_and_through_the_cluster(local, cases, in_process_cluster):
    assert len(cases) >= 30, [c.name for c, _ in cases]
    assert sum(case.real for case, _ in cases) >= 10
    greedy = {case.name: (SamplingParams(max_tokens=MAX_TOKENS, constraint=c), [Message("user", case.task)])
              for case, c in cases}
    sampled = {case.name: (SamplingParams(max_tokens=MAX_TOKENS, temperature=0.8, seed=i, constraint=c),
                           [Message("user", case.task)]) for i, (case, c) in enumerate(cases)}
    by_name = {case.name: case for case, _ in cases}
    cluster = in_process_cluster(1, 1, settings=SETTINGS, num_blocks=1024, start_timeout_s=600)
    want = run_local(local, greedy)
    problems = [p for name, toks in want.items() if (p := valid(by_name[name], local.tokenizer.decode(toks)))]
    local_sampled = run_local(local, sampled)
    problems += [p for name, toks in local_sampled.items()
                 if (p := valid(by_name[name], local.tokenizer.decode(toks)))]
    got = run_cluster(cluster.address, greedy)
    for name, res in got.items():
        assert not isinstance(res, Exception), f"{name}: {res!r}"
        assert res.token_ids == want[name], name  # greedy: the cluster gives what one engine gives
        problems += [p for p in [valid(by_name[name], res.text)] if p]
    for name, res in run_cluster(cluster.address, sampled).items():
        assert not isinstance(res, Exception), f"{name}: {res!r}"
        problems += [p for p in [valid(by_name[name], res.text)] if p]
    assert not problems, "\n".join(problems)


REGEXES = [r"\(\d{3}\) \d{3}-\d{4}", r"20[0-9]{2}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])",
           r"[A-Z][a-z]{2,10}( [A-Z][a-z]{2,10}){0,2}", r"(red|green|blue)(, (red|green|blue)){0,3}"]
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                      "parameters": {"type": "object", "additionalProperties": False,
                                                     "properties": {"city": {"type": "string", "maxLength": 30},
                                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                                                     "required": ["city", "unit"]}}},
    {"type": "function", "function": {"name": "convert_currency", "description": "Convert money",
                                      "parameters": {"type": "object", "additionalProperties": False,
                                                     "properties": {"amount": {"type": "number", "minimum": 0},
                                                                    "from": {"type": "string", "pattern": "^[A-Z]{3}$"},
                                                                    "to": {"type": "string", "pattern": "^[A-Z]{3}$"}},
                                                     "required": ["amount", "from", "to"]}}},
]


@pytest.mark.timeout(1800)
def test_regex_choice_tools_logprobs_and_n_over_http(real_model_dir, local, in_process_cluster):
    port = free_port()
    cluster = in_process_cluster(1, 1, settings=SETTINGS, num_blocks=1024, http_port=port, start_timeout_s=600)
    api = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=600)
    model = api.models.list().data[0].id
    ask = [{"role": "user", "content": "Give me an example."}]
    for rx in REGEXES:
        for temperature, seed in ((0.0, 0), (1.0, 1), (1.0, 2)):
            out = api.chat.completions.create(model=model, messages=ask, max_tokens=60, temperature=temperature,
                                              seed=seed, extra_body={"structured_outputs": {"regex": rx}})
            assert re.fullmatch(rx, out.choices[0].message.content), (rx, out.choices[0].message.content)
    choices = ["positive", "negative", "neutral"]
    for temperature, seed in ((0.0, 0), (1.5, 3), (1.5, 4)):
        out = api.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Sentiment of 'what a lovely day'?"}],
            temperature=temperature, seed=seed, extra_body={"guided_choice": choices})
        assert out.choices[0].message.content in choices
    # tool_choice required: every output is one call of a declared function, its arguments valid
    params = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    for prompt, seed in (("What's the weather in Lyon?", 0), ("Convert 20 euros to dollars.", 5),
                         ("Weather in Oslo in fahrenheit, please.", 6)):
        for temperature in (0.0, 1.0):
            out = api.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                              tools=TOOLS, tool_choice="required", max_tokens=120,
                                              temperature=temperature, seed=seed)
            choice = out.choices[0]
            assert choice.finish_reason == "tool_calls", choice
            (call,) = choice.message.tool_calls
            jsonschema.validate(json.loads(call.function.arguments), params[call.function.name])
    named = api.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], tools=TOOLS,
                                        tool_choice={"type": "function", "function": {"name": "convert_currency"}})
    assert named.choices[0].message.tool_calls[0].function.name == "convert_currency"
    # logprobs: the raw log-softmax, here against Hugging Face's forward pass
    from transformers import AutoModelForCausalLM

    msgs = [{"role": "user", "content": "Name a primary color."}]
    out = api.chat.completions.create(model=model, messages=msgs, max_tokens=12, logprobs=True, top_logprobs=5,
                                      extra_body={"return_token_ids": True})
    prompt = local.tokenizer.encode_chat([Message("user", msgs[0]["content"])])
    ids = out.choices[0].token_ids
    hf = AutoModelForCausalLM.from_pretrained(str(real_model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([prompt + ids[:-1]])).logits[0].float(), -1)[len(prompt) - 1:]
    content = out.choices[0].logprobs.content
    assert len(content) == len(ids)
    for j, entry in enumerate(content):
        assert abs(entry.logprob - float(ref[j, ids[j]])) < 1e-4, j
        top_ids = torch.topk(ref[j], 5).indices.tolist()
        assert [bytes(t.bytes) for t in entry.top_logprobs] == [local.grammar.tokenizer.decode_bytes([t]) for t in top_ids]
        assert max(abs(t.logprob - float(ref[j, i])) for t, i in zip(entry.top_logprobs, top_ids)) < 1e-4
    # n=4: four samples, differing by seed; the prompt computed once (one prefill lookup of its tokens)
    with Client(cluster.address) as c:
        time.sleep(1.2)
        before = {n.node_id: (n.role, n.prefix_queries_tokens) for n in c.status().nodes}
        out = api.chat.completions.create(model=model, messages=[{"role": "user", "content": "Write a haiku."}],
                                          n=4, temperature=1.0, seed=11, max_tokens=24)
        assert [ch.index for ch in out.choices] == [0, 1, 2, 3]
        assert len({ch.message.content for ch in out.choices}) > 1
        prompt_len = len(local.tokenizer.encode_chat([Message("user", "Write a haiku.")]))
        assert out.usage.prompt_tokens == prompt_len
        time.sleep(1.2)
        after = {n.node_id: n.prefix_queries_tokens for n in c.status().nodes}
        assert sorted((role, after[k] - q) for k, (role, q) in before.items()) == [("decode", 0), ("prefill", prompt_len)]
