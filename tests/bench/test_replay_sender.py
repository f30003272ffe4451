"""The open-loop sender against the in-process FakeClient."""

import asyncio
from collections.abc import AsyncIterator

import pytest

from bench.replay.client import (
    PREFIX_CACHE_HITS,
    PREFIX_CACHE_QUERIES,
    ReplayClient,
    StreamEvent,
)
from bench.replay.fake_client import FakeClient, FakeClientConfig
from bench.replay.sender import Outcome, replay
from bench.replay.workload import ReplayRequest

TOLERANCE_S = 0.08  # two shared CPU cores: generous, but far below the delays tested


def request(request_id, offset_s, prompt_tokens=16, max_tokens=3, first_token=100):
    prompt = tuple(range(first_token, first_token + prompt_tokens))
    return ReplayRequest(request_id, 0, offset_s, prompt, max_tokens, (0,))


def run(requests, client, timeout_s=5.0):
    return asyncio.run(replay(requests, client, request_timeout_s=timeout_s))


def test_fake_client_satisfies_the_protocol():
    assert isinstance(FakeClient(), ReplayClient)


def test_requests_leave_on_schedule_even_while_earlier_ones_are_slow():
    # Request a's prefill takes 0.6 s and blocks the fake's single prefill worker;
    # b and c must still be sent at 0.15 s and 0.3 s.
    client = FakeClient(FakeClientConfig(ttft_base_s=0.0, ttft_per_token_s=0.6 / 1000, tbt_s=0.01))
    requests = [
        request("a", 0.0, prompt_tokens=1000),
        request("b", 0.15, first_token=5000),
        request("c", 0.3, first_token=6000),
    ]
    result = run(requests, client)
    a, b, c = result.records
    assert [r.outcome for r in result.records] == [Outcome.COMPLETED] * 3
    for record in result.records:
        assert abs(record.sent_s - record.scheduled_s) < TOLERANCE_S
    starts = [call.started_at for call in client.calls]
    assert starts[1] - starts[0] == pytest.approx(0.15, abs=TOLERANCE_S)
    assert starts[2] - starts[0] == pytest.approx(0.3, abs=TOLERANCE_S)
    assert a.token_times_s[0] > c.sent_s  # c was sent before a's first token
    assert b.token_times_s[0] >= a.token_times_s[0]  # and then queued behind a's prefill
    assert a.output_tokens == 3


def test_every_request_is_accounted_for_with_reasons():
    config = FakeClientConfig(max_prompt_tokens=32, fail_after_tokens={"broken": 2, "dead": 0})
    client = FakeClient(config)
    requests = [
        request("fine", 0.0),
        request("long", 0.0, prompt_tokens=64),
        request("broken", 0.01, max_tokens=5),
        request("dead", 0.02),
    ]
    records = {r.request_id: r for r in run(requests, client).records}
    assert records["fine"].outcome is Outcome.COMPLETED and records["fine"].reason is None
    assert records["long"].outcome is Outcome.REJECTED
    assert records["long"].reason == "prompt of 64 tokens exceeds 32"
    assert records["broken"].outcome is Outcome.FAILED
    assert records["broken"].reason == "injected failure after 2 tokens"
    assert records["broken"].output_tokens == 2
    assert records["dead"].reason == "injected failure after 0 tokens"
    assert client.running == 0


def test_queue_based_rejection_keeps_the_reason():
    client = FakeClient(FakeClientConfig(ttft_base_s=0.3, ttft_per_token_s=0.0, max_queue_s=0.1))
    records = run([request("first", 0.0), request("second", 0.0)], client).records
    assert records[0].outcome is Outcome.COMPLETED
    assert records[1].outcome is Outcome.REJECTED
    assert records[1].reason.startswith("predicted prefill queue wait")


def test_a_stuck_request_times_out_and_its_stream_is_closed():
    client = FakeClient(FakeClientConfig(ttft_base_s=0.0, ttft_per_token_s=0.0, tbt_s=10.0))
    result = run([request("stuck", 0.0, max_tokens=5)], client, timeout_s=0.2)
    (record,) = result.records
    assert record.outcome is Outcome.FAILED
    assert record.reason == "timed out after 0.2s with 1 token(s)"
    assert result.wall_s < 1.0
    assert client.running == 0  # the fake's finally ran: the stream was closed


class ScriptedClient:
    """Yields scripted events per request; raises scripted errors."""

    def __init__(self, script):
        self.script = script

    async def node_metrics(self):
        return {}

    async def generate(
        self, request_id, prompt_token_ids, max_tokens
    ) -> AsyncIterator[StreamEvent]:
        for item in self.script[request_id]:
            if isinstance(item, Exception):
                raise item
            await asyncio.sleep(0.01)
            yield StreamEvent(item)


def test_multi_token_messages_share_an_arrival_time():
    client = ScriptedClient({"a": [(1,), (2, 3, 4)]})
    (record,) = run([request("a", 0.0, max_tokens=4)], client).records
    assert record.output_tokens == 4
    assert record.token_times_s[1] == record.token_times_s[2] == record.token_times_s[3]


def test_client_bugs_and_empty_streams_become_failures_with_reasons():
    client = ScriptedClient({"bug": [KeyError("oops")], "empty": []})
    records = run([request("bug", 0.0), request("empty", 0.0)], client).records
    assert records[0].outcome is Outcome.FAILED
    assert records[0].reason == "client error KeyError: 'oops'"
    assert records[1].outcome is Outcome.FAILED
    assert records[1].reason == "stream ended without tokens"


def test_records_come_back_in_workload_order_and_ids_must_be_unique():
    client = ScriptedClient({"late": [(1,)], "early": [(1,)]})
    records = run([request("late", 0.05), request("early", 0.0)], client).records
    assert [r.request_id for r in records] == ["late", "early"]
    with pytest.raises(ValueError, match="unique"):
        run([request("x", 0.0), request("x", 0.1)], ScriptedClient({"x": [(1,)]}))


def test_fake_prefix_cache_counts_hits_in_whole_blocks():
    client = FakeClient(FakeClientConfig(cache_block_tokens=16))
    shared = request("one", 0.0, prompt_tokens=40)
    longer = ReplayRequest("two", 0, 0.1, shared.prompt_token_ids[:32] + (9,) * 16, 2, (0,))
    result = run([shared, longer], client)
    before, after = result.metrics_before, result.metrics_after
    hits = after[PREFIX_CACHE_HITS] - before[PREFIX_CACHE_HITS]
    queries = after[PREFIX_CACHE_QUERIES] - before[PREFIX_CACHE_QUERIES]
    assert (hits, queries) == (32, 88)
