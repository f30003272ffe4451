"""Fault injection: a seeded fraction of batches fails (InjectedFault on the handle, nothing
sent) or starts late (timeout still counted from submission); the env var reaches engines
built without an explicit plan."""

from __future__ import annotations

import random
import time
from typing import Iterator

import numpy as np
import pytest

from transfer_engine import (
    EngineClosed,
    TransferCancelled,
    TransferEngine,
    TransferState,
    TransferTimeout,
)
from transfer_engine.faults import ENV_VAR, FaultCounts, FaultPlan, FaultPlanError, InjectedFault

BLOCK = 4096


@pytest.fixture
def engines() -> Iterator:
    """make(faults) -> (sender with that plan, connected peer, sender region, receiver array)."""
    made: list[TransferEngine] = []

    def make(faults, blocks: int = 256):
        receiver = TransferEngine("receiver", transport="tcp", faults=FaultPlan())
        made.append(receiver)
        sender = TransferEngine("sender", transport="tcp", faults=faults)
        made.append(sender)
        dst = np.zeros(blocks * BLOCK, dtype=np.uint8)
        receiver.register(dst)
        src = np.random.default_rng(1).integers(1, 256, blocks * BLOCK, dtype=np.uint8)
        region = sender.register(src)
        peer = sender.connect(receiver.address)
        return sender, peer, region, dst, src

    yield make
    for engine in made:
        engine.close()


def write_block(sender, peer, region, i: int, timeout=10.0):
    return sender.write(peer, [(region, i * BLOCK, peer.regions[0], i * BLOCK, BLOCK)], timeout=timeout)


def settle(handles) -> None:
    """Wait for every batch; only injected failures may fail."""
    for h in handles:
        try:
            h.wait(10)
        except InjectedFault:
            pass


def reference_failures(seed: int, fraction: float, n: int) -> list[int]:
    rng = random.Random(seed)
    return [i for i in range(n) if rng.random() < fraction]


def test_plan_text_round_trips_and_bad_text_names_the_key():
    plan = FaultPlan.parse("fail=0.1,delay=0.1:0.2,seed=7")
    assert plan == FaultPlan(fail=0.1, delay=0.1, delay_s=0.2, seed=7)
    assert FaultPlan.parse(str(plan)) == plan
    assert FaultPlan.parse("") == FaultPlan() and not FaultPlan().active
    for text, says in [("fail=1.5", "fail: a fraction of batches must be within [0, 1], got 1.5"),
                       ("fail=0.6,delay=0.5:1", "fail + delay must be at most 1"),
                       ("delay=0.1", "delay: give the delay as FRACTION:SECONDS"),
                       ("delay=0.1:-1", "delay: seconds must be within [0, 3600], got -1.0"),
                       ("fail=lots", "fail: not a number: 'lots'"),
                       ("seed=1.5", "seed: not a number: '1.5'"),
                       ("fail=0.1,fail=0.2", "fail: given twice"),
                       ("drop=0.1", "drop: unknown key"),
                       ("fail", "'fail': expected key=value")]:
        with pytest.raises(FaultPlanError) as info:
            FaultPlan.parse(text)
        assert says in str(info.value), (text, str(info.value))


def test_env_var_reaches_an_engine_built_without_a_plan_and_an_explicit_plan_wins(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "fail=0.25,seed=3")
    with TransferEngine("from-env", transport="tcp") as engine:
        assert engine.faults is not None and engine.faults.plan == FaultPlan(fail=0.25, seed=3)
    with TransferEngine("explicit-off", transport="tcp", faults=FaultPlan()) as engine:
        assert engine.faults is None
    monkeypatch.setenv(ENV_VAR, "fail=2")
    with pytest.raises(FaultPlanError, match=f"{ENV_VAR}='fail=2': fail: a fraction"):
        TransferEngine("bad-env", transport="tcp")
    monkeypatch.delenv(ENV_VAR)
    with TransferEngine("no-env", transport="tcp") as engine:
        assert engine.faults is None


def test_a_seed_fails_exactly_the_same_batches_as_error_on_the_handle_and_sends_nothing_for_them(engines):
    n = 200
    sender, peer, region, dst, src = engines("fail=0.1,seed=7")
    handles = [write_block(sender, peer, region, i) for i in range(n)]
    settle(handles)
    failed = [i for i, h in enumerate(handles) if h.poll() is TransferState.FAILED]
    assert failed == reference_failures(7, 0.1, n)
    assert len(failed) == 25  # pinned: seed 7 fails these 25 of the first 200 batches
    assert sender.faults.counts() == FaultCounts(batches=n, failed=25, delayed=0)
    for i, h in enumerate(handles):
        block = slice(i * BLOCK, (i + 1) * BLOCK)
        if i in failed:
            assert isinstance(h.error, InjectedFault)
            assert f"batch #{h.id} (write, {BLOCK} bytes) to receiver: failed by fault injection (fail=0.1,seed=7)" \
                in str(h.error)
            assert not dst[block].any(), f"failed batch {i} wrote bytes"
        else:
            assert h.poll() is TransferState.DONE
            assert np.array_equal(dst[block], src[block])
    assert sender.stats().batches_failed == 25

    # another engine with the same seed fails the same batches; another seed, others
    again, peer2, region2, _, _ = engines("fail=0.1,seed=7")
    other, peer3, region3, _, _ = engines("fail=0.1,seed=8")
    same = [write_block(again, peer2, region2, i) for i in range(n)]
    diff = [write_block(other, peer3, region3, i) for i in range(n)]
    settle(same + diff)
    assert [i for i, h in enumerate(same) if h.poll() is TransferState.FAILED] == failed
    assert [i for i, h in enumerate(diff) if h.poll() is TransferState.FAILED] != failed


def test_reads_draw_too(engines):
    sender, peer, region, _, _ = engines("fail=1.0,seed=0")
    h = sender.read(peer, [(region, 0, peer.regions[0], 0, BLOCK)])
    with pytest.raises(InjectedFault, match=r"\(read, 4096 bytes\) to receiver"):
        h.wait(5)
    assert sender.faults.counts() == FaultCounts(1, 1, 0)


def test_delayed_batches_start_late_and_still_land(engines):
    sender, peer, region, dst, src = engines("delay=0.5:1.0,seed=1")
    n = 20
    t0 = time.monotonic()
    handles = [write_block(sender, peer, region, i) for i in range(n)]
    for h in handles:
        h.wait(10)
    delayed = reference_failures(1, 0.5, n)  # the same draw picks the delayed ones
    assert sender.faults.counts() == FaultCounts(n, 0, len(delayed)) and 0 < len(delayed) < n
    for i, h in enumerate(handles):
        assert h.poll() is TransferState.DONE
        if i in delayed:
            assert h.latency_s >= 1.0, (i, h.latency_s)
        else:
            assert h.latency_s < 1.0, (i, h.latency_s)
    assert np.array_equal(dst[: n * BLOCK], src[: n * BLOCK])
    assert time.monotonic() - t0 < 6.0  # delays overlap: one timer thread, not one delay after another


def test_a_delay_counts_against_the_timeout_and_cancel_ends_a_delayed_batch_at_once(engines):
    sender, peer, region, dst, _ = engines("delay=1.0:0.5,seed=0")
    late = write_block(sender, peer, region, 0, timeout=0.1)
    with pytest.raises(TransferTimeout, match="did not complete within its 0.1s timeout"):
        late.wait(5)
    assert late.latency_s < 0.45

    cancelled = write_block(sender, peer, region, 1)
    assert cancelled.cancel()
    assert cancelled.poll() is TransferState.CANCELLED
    with pytest.raises(TransferCancelled):
        cancelled.wait(1)
    time.sleep(0.8)  # past the delay: neither batch may have been sent after all
    assert not dst[: 2 * BLOCK].any()
    st = sender.stats()
    assert (st.batches_submitted, st.batches_failed, st.batches_cancelled, st.bytes_written) == (2, 1, 1, 0)


def test_closing_the_engine_fails_batches_still_delayed(engines):
    sender, peer, region, _, _ = engines("delay=1.0:30,seed=0")
    h = write_block(sender, peer, region, 0, timeout=None)
    t0 = time.monotonic()
    sender.close()
    with pytest.raises(EngineClosed, match="closed while batch"):
        h.wait(5)
    assert time.monotonic() - t0 < 5.0
