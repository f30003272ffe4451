"""`halfmoon profile` measures the KV tiers' load times through the real tier code and writes
them into the cost model the conductor loads, so lower-tier hits are priced by measurement."""
from __future__ import annotations

import time

import pytest

from bench.profile import measure_tier_loads
from conductor.cost_model import CostModel, TierTiming, TransferModel, tier_rates
from conductor.live import cpu_default_costs
from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.tiers import FakeStore, TierConfig, TierManager
from engine.tiers.record import record_bytes

BLOCKS = 8


class DelayStore(FakeStore):
    """A store whose every get takes `delay_s` more (a slow network, known in advance)."""

    def __init__(self, delay_s: float) -> None:
        super().__init__()
        self.delay_s = delay_s
        self.get_calls = 0

    def get_into(self, keys, addresses, lengths):
        self.get_calls += 1
        time.sleep(self.delay_s)
        return super().get_into(keys, addresses, lengths)


def measure(tiny_model_dir, tmp_path, delay_s: float) -> tuple[LLMEngine, list[TierTiming], DelayStore]:
    eng = LLMEngine(tiny_model_dir, EngineConfig(num_blocks=32))
    gib = (2 * BLOCKS + 8) * record_bytes(eng.kv.block_bytes, 16) / (1 << 30)
    store = DelayStore(delay_s)
    tiers = TierManager.attach(eng, TierConfig(host_gib=gib, disk_gib=gib, disk_dir=str(tmp_path / "kv"), store=True),
                               store=lambda: store, prefetch_timeout_s=60.0)
    timings = measure_tier_loads(eng, tiers, BLOCKS, cold_disk=False)  # no fsync: a busy disk can stall it
    assert tiers.flush() and tiers.problems() == []
    assert eng.pool.num_cached == 0 and eng.pool.num_free == 32  # the device is left as it was
    tiers.close()
    return eng, timings, store


@pytest.mark.parametrize("delay_s", [0.02, 0.06])
def test_a_store_with_a_known_delay_is_measured_at_its_rate(tiny_model_dir, tmp_path, delay_s):
    eng, timings, store = measure(tiny_model_dir, tmp_path, delay_s)
    by = {t.tier: t for t in timings}
    assert list(by) == ["host", "disk", "cluster"]
    assert all(t.blocks == BLOCKS and t.block_bytes == eng.kv.block_bytes for t in timings)
    assert store.get_calls == BLOCKS  # every block came from the store, one get each
    c = by["cluster"]
    assert delay_s <= c.seconds_per_block <= 1.5 * delay_s + 0.02  # the delay, plus a copy and a checksum
    assert eng.kv.block_bytes / (1.5 * delay_s + 0.02) <= c.bytes_per_s <= eng.kv.block_bytes / delay_s
    for t in (by["host"], by["disk"]):  # no delay there: far below the store's
        assert 0 < t.seconds_per_block < delay_s


def test_the_conductor_prices_lower_tier_hits_at_the_measured_rates(tiny_model_dir, tmp_path):
    eng, timings, _ = measure(tiny_model_dir, tmp_path, 0.03)
    base = cpu_default_costs()
    bs = 16
    model = CostModel(base.prefill, base.decode,
                      TransferModel(kv_bytes_per_token=eng.kv.block_bytes / bs, network_bytes_per_s=3e9,
                                    tier_bytes_per_s=tier_rates(timings)),
                      tier_timings=tuple(timings))
    path = tmp_path / "cost_model.json"
    model.save(path)
    loaded = CostModel.load(path)  # what `halfmoon serve --cost-model` hands the conductor
    assert loaded.tier_timings == tuple(timings)
    s = {t.tier: t.seconds_per_block for t in timings}
    assert loaded.tier_load_s("host", bs) == pytest.approx(s["host"])
    assert loaded.tier_load_s("disk", bs) == pytest.approx(s["disk"] + s["host"])  # staged in host memory first
    assert loaded.tier_load_s("cluster", 3 * bs) == pytest.approx(3 * (s["cluster"] + s["host"]))
    assert loaded.tier_load_s("cluster", bs) >= 0.03


@pytest.mark.slow
def test_profile_writes_measured_tier_rates(tiny_model_dir, tmp_path):
    """The whole `halfmoon profile --quick` on the tiny model: the cost model file it writes
    carries the tier rates it measured (the cluster store too, where Mooncake Store runs)."""
    from bench.profile import main
    from engine.tiers.mooncake_store import store_unavailable_reason

    out = tmp_path / "cm.json"
    assert main(["--model", str(tiny_model_dir), "--quick", "--tier-blocks", "4", "--tier-dir", str(tmp_path),
                 "--out", str(out)]) == 0
    cm = CostModel.load(out)
    tiers = {t.tier: t for t in cm.tier_timings}
    assert {"host", "disk"} <= set(tiers) and all(t.blocks == 4 for t in tiers.values())
    assert ("cluster" in tiers) == (store_unavailable_reason() is None)
    assert cm.transfer.tier_bytes_per_s == pytest.approx({t: v.bytes_per_s for t, v in tiers.items()})
    assert cm.tier_load_s("disk", 16) == pytest.approx(tiers["disk"].seconds_per_block
                                                        + tiers["host"].seconds_per_block)
