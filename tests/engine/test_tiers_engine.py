"""The tiers under a real engine (tiny random model): demotion, planning, prefetch, promotion,
write policies, decode write-back; tokens never change, a damaged block is never used, a
broken store never fails a request."""
from __future__ import annotations

import threading
import time

import pytest

from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.sampling import SamplingParams
from engine.tiers import FakeStore, TierConfig, TierManager
from engine.tiers.record import record_bytes

GREEDY = SamplingParams(max_tokens=8, ignore_eos=True)
BS = 16
PROMPT = list(range(300, 300 + 6 * BS + 5))  # 6 full blocks + 5 tokens


def gib(engine: LLMEngine, blocks: int) -> float:
    return blocks * record_bytes(engine.kv.block_bytes, BS) / (1 << 30)


def make(tiny_model_dir, tmp_path, *, num_blocks=32, host=64, disk=64, store: FakeStore | None = None,
         **kw) -> tuple[LLMEngine, TierManager]:
    eng = LLMEngine(tiny_model_dir, EngineConfig(num_blocks=num_blocks))
    cfg = TierConfig(host_gib=gib(eng, host), disk_gib=gib(eng, disk) if disk else 0.0,
                     disk_dir=str(tmp_path / "kv"), store=store is not None, **kw)
    tiers = TierManager.attach(eng, cfg, store=(lambda: store) if store is not None else None)
    return eng, tiers


def evict_device(eng: LLMEngine) -> None:
    """Make the device evict every cached block (each is demoted on the way out)."""
    blocks = eng.pool.allocate(eng.pool.num_free)
    eng.pool.free(blocks)
    assert eng.pool.num_cached == 0


def settle(tiers: TierManager) -> None:
    assert tiers.flush()
    assert tiers.problems() == []


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    """Greedy tokens with no prefix caching at all (a fresh engine for each prompt)."""
    cache: dict[tuple, list[int]] = {}

    def ref(prompt: list[int], params: SamplingParams = GREEDY) -> list[int]:
        key = (tuple(prompt), params.max_tokens)
        if key not in cache:
            cache[key] = LLMEngine(tiny_model_dir, EngineConfig(num_blocks=64)).generate([prompt], params)[0]
        return cache[key]
    return ref


def test_tokens_identical_from_every_tier(tiny_model_dir, tmp_path, reference):
    store = FakeStore()
    eng, tiers = make(tiny_model_dir, tmp_path, store=store)
    want = reference(PROMPT)
    assert eng.generate([PROMPT], GREEDY)[0] == want  # computed
    assert eng.generate([PROMPT], GREEDY)[0] == want  # device prefix cache
    hits = lambda: tiers.stats().hit_tokens  # noqa: E731
    assert hits() == {"device": 96, "host": 0, "disk": 0, "cluster": 0}
    evict_device(eng)
    settle(tiers)
    assert tiers.host.num_cached == 6 and len(store.keys()) == 6  # the 6 full blocks (+ 7 answer tokens: partial)
    assert eng.generate([PROMPT], GREEDY)[0] == want
    assert hits()["host"] == 96
    evict_device(eng)
    settle(tiers)
    assert tiers.spill_host() == 6
    settle(tiers)
    assert tiers.host.num_cached == 0 and tiers.disk.num_cached == 6
    assert eng.generate([PROMPT], GREEDY)[0] == want
    assert hits()["disk"] == 96
    evict_device(eng)
    settle(tiers)
    tiers.spill_host()
    settle(tiers)
    tiers.disk.clear()
    assert eng.generate([PROMPT], GREEDY)[0] == want
    assert hits() == {"device": 96, "host": 96, "disk": 96, "cluster": 96}
    st = tiers.stats()
    rb = tiers.record_bytes
    assert st.bytes_moved["disk->host"] == 6 * rb and st.bytes_moved["cluster->host"] == 6 * rb
    assert st.bytes_moved["host->device"] == 3 * 6 * eng.kv.block_bytes
    assert st.load_latency["disk"].count == 6 and st.load_latency["cluster"].count == 6
    settle(tiers)
    assert eng.stats().num_blocks_free == 32
    tiers.close()


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_damaged_disk_block_is_caught_and_recomputed(tiny_model_dir, tmp_path, reference, damage):
    eng, tiers = make(tiny_model_dir, tmp_path)
    want = reference(PROMPT)
    eng.generate([PROMPT], GREEDY)
    evict_device(eng)
    tiers.spill_host()
    settle(tiers)
    from engine.block_pool import block_hashes

    third = block_hashes(PROMPT, BS)[3]
    path = tiers.disk.path_of(third)
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[1000] ^= 0x01
    else:
        data = data[:4096]
    path.write_bytes(bytes(data))
    before = eng.stats().num_prefill_tokens
    assert eng.generate([PROMPT], GREEDY)[0] == want
    assert tiers.stats().hit_tokens["disk"] == 3 * BS  # blocks 0-2; the chain stops at the damaged one
    assert eng.stats().num_prefill_tokens - before == len(PROMPT) - 3 * BS
    assert tiers.stats().events["corrupt_blocks"] == 1
    assert not path.exists()
    settle(tiers)
    tiers.close()


@pytest.mark.parametrize("broken", ["down", "full", "failing"])
def test_a_broken_store_makes_requests_slower_never_failed(tiny_model_dir, tmp_path, reference, broken):
    store = FakeStore(capacity_bytes=0 if broken == "full" else 1 << 30)
    store.down = broken == "down"
    store.fail_puts = 1000 if broken == "failing" else 0
    eng, tiers = make(tiny_model_dir, tmp_path, disk=0, store=store)
    want = reference(PROMPT)
    assert eng.generate([PROMPT], GREEDY)[0] == want
    evict_device(eng)
    settle(tiers)
    tiers.spill_host()  # nothing below the host pool now but the broken store
    assert eng.generate([PROMPT], GREEDY)[0] == want
    st = tiers.stats()
    assert st.hit_tokens["cluster"] == 0
    if broken == "down":
        assert st.store_state == "down" and "down" in st.store_reason
    else:
        assert st.events["put_failures"] == 6 and st.store_state == "up"
    settle(tiers)
    tiers.close()


def test_write_policies(tiny_model_dir, tmp_path):
    eng, tiers = make(tiny_model_dir, tmp_path, disk=0, policy="write_through")
    eng.generate([PROMPT], GREEDY)
    assert tiers.host.num_cached == 6  # every computed full block, at once (the answer's is partial)
    tiers.close()

    eng, tiers = make(tiny_model_dir, tmp_path, disk=0, policy="write_back")
    eng.generate([PROMPT], GREEDY)
    eng.generate([PROMPT], GREEDY)
    assert tiers.host.num_cached == 0  # nothing leaves the device until it is evicted
    evict_device(eng)
    assert tiers.host.num_cached == 6
    tiers.close()

    eng, tiers = make(tiny_model_dir, tmp_path, disk=0, policy="write_through_selective", selective_hits=2)
    eng.generate([PROMPT], GREEDY)
    eng.generate([PROMPT], GREEDY)  # first hit
    assert tiers.host.num_cached == 0
    eng.generate([PROMPT], GREEDY)  # second hit: copied down
    assert tiers.host.num_cached == 6
    eng.generate([list(range(900, 950))], GREEDY)  # 3 blocks never hit
    evict_device(eng)
    assert tiers.host.num_cached == 6  # evicted unhit blocks are dropped, not demoted
    tiers.close()


class SlowStore(FakeStore):
    def __init__(self, delay_s: float) -> None:
        super().__init__()
        self.delay_s = delay_s
        self.getting = threading.Event()

    def get_into(self, keys, addresses, lengths):
        self.getting.set()
        time.sleep(self.delay_s)
        return super().get_into(keys, addresses, lengths)


def test_loads_overlap_the_steps_of_other_requests(tiny_model_dir, tmp_path, reference):
    store = SlowStore(0.05)
    eng, tiers = make(tiny_model_dir, tmp_path, disk=0, store=store)
    eng.generate([PROMPT], GREEDY)
    evict_device(eng)
    settle(tiers)
    tiers.spill_host()  # the prompt's blocks are in the store only
    other = list(range(5000, 5040))
    eng.add_request("cached", GREEDY, prompt_token_ids=PROMPT)
    eng.add_request("other", SamplingParams(max_tokens=40, ignore_eos=True), prompt_token_ids=other)
    assert tiers.num_parked == 2 and not eng.scheduler.waiting  # both wait for the store's answer
    out: dict[str, list[int]] = {"other": [], "cached": []}
    other_tokens_while_parked = 0
    while eng.has_unfinished():
        parked = tiers.num_parked
        for o in eng.step():
            out[o.request_id] += o.new_token_ids
            if parked and o.request_id == "other":
                other_tokens_while_parked += len(o.new_token_ids)
    assert other_tokens_while_parked >= 2  # the store's 6 x 50 ms of loads ran beside other's steps
    assert out["cached"] == reference(PROMPT)
    assert out["other"] == reference(other, SamplingParams(max_tokens=40, ignore_eos=True))
    assert tiers.stats().hit_tokens["cluster"] == 96
    settle(tiers)
    tiers.close()


def test_a_prefetch_past_its_timeout_admits_the_request_without_it(tiny_model_dir, tmp_path, reference):
    store = SlowStore(1.0)
    eng, tiers = make(tiny_model_dir, tmp_path, disk=0, store=store)
    tiers.prefetch_timeout_s = 0.2
    eng.generate([PROMPT], GREEDY)
    evict_device(eng)
    settle(tiers)
    tiers.spill_host()
    t0 = time.monotonic()
    assert eng.generate([PROMPT], GREEDY)[0] == reference(PROMPT)
    assert time.monotonic() - t0 < 0.9 + 5  # did not wait for the first 1 s load (generous: loaded machine)
    st = tiers.stats()
    assert st.events["prefetch_timeouts"] == 1 and st.hit_tokens["cluster"] == 0
    settle(tiers)  # the late loads finish and give their pins back
    tiers.close()


def test_abort_of_a_parked_request_gives_its_pins_back(tiny_model_dir, tmp_path):
    store = SlowStore(0.2)
    eng, tiers = make(tiny_model_dir, tmp_path, disk=0, store=store)
    eng.generate([PROMPT], GREEDY)
    evict_device(eng)
    settle(tiers)
    tiers.spill_host()
    eng.add_request("r", GREEDY, prompt_token_ids=PROMPT)
    assert tiers.num_parked == 1
    assert store.getting.wait(5)
    assert eng.abort("r")
    assert not eng.has_unfinished()
    settle(tiers)
    assert tiers.host.num_pinned == 0 and eng.stats().num_blocks_free == 32
    tiers.close()


def test_decode_write_back_lets_another_node_reuse_prompt_and_answer(tiny_model_dir, tmp_path, reference):
    store = FakeStore()
    decode, dt = make(tiny_model_dir, tmp_path / "d", disk=0, store=store, write_back_on_finish=True)
    params = SamplingParams(max_tokens=30, ignore_eos=True)
    answer = decode.generate([PROMPT], params)[0]
    settle(dt)
    computed = len(PROMPT) + len(answer) - 1  # the last token's KV is never computed
    assert len(store.keys()) == computed // BS == 8
    other, ot = make(tiny_model_dir, tmp_path / "p", disk=0, store=store)  # a node that never saw turn 1
    turn2 = PROMPT + answer + list(range(7000, 7020))
    assert other.generate([turn2], GREEDY)[0] == reference(turn2)
    assert ot.stats().hit_tokens["cluster"] == computed // BS * BS  # prompt + answer less the partial block
    settle(ot)
    dt.close()
    ot.close()


def test_a_decode_nodes_tiers_write_back_and_copy_nothing_down(tiny_model_dir, tmp_path):
    """`copy_down` off (a decode node, `cluster.kv_tiers.role_tiers`): evictions and device
    hits move nothing into the host pool under any policy (`test_write_policies` shows each
    policy moving blocks with it on); a finished request's write-back still reaches the store."""
    for policy in ("write_back", "write_through", "write_through_selective"):
        eng, tiers = make(tiny_model_dir, tmp_path / policy, disk=0, policy=policy, selective_hits=1,
                          copy_down=False)
        eng.generate([PROMPT], GREEDY)
        eng.generate([PROMPT], GREEDY)  # device hits
        evict_device(eng)
        settle(tiers)
        assert tiers.host.num_cached == 0 and "device->host" not in tiers.stats().bytes_moved, policy
        tiers.close()
    store = FakeStore()
    eng, tiers = make(tiny_model_dir, tmp_path / "wb", disk=0, store=store, write_back_on_finish=True,
                      copy_down=False)
    answer = eng.generate([PROMPT], GREEDY)[0]
    evict_device(eng)
    settle(tiers)
    written = (len(PROMPT) + len(answer) - 1) // BS
    assert len(store.keys()) == tiers.host.num_cached == written == 6  # the write-back's blocks, staged, only
    assert tiers.stats().bytes_moved["device->host"] == written * eng.kv.block_bytes
    tiers.close()


def test_the_writer_thread_yields_to_the_engine_the_loaders_do_not(tiny_model_dir, tmp_path):
    import os

    from engine.tiers.manager import WRITER_NICE

    eng, tiers = make(tiny_model_dir, tmp_path, store=FakeStore())
    settle(tiers)  # the store connected, then the writer lowered its priority
    base = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    nice = {t.name: os.getpriority(os.PRIO_PROCESS, t.native_id) for t in tiers._threads}
    assert nice == {"kv-tier-writer": min(19, base + WRITER_NICE), "kv-tier-loader-0": base,
                    "kv-tier-loader-1": base}
    tiers.close()
