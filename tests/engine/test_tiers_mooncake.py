"""The cluster tier on the real Mooncake Store (a `mooncake_master` on loopback), and the
real model's greedy tokens whichever tier the prefix came from."""
from __future__ import annotations

import socket
import time

import pytest

from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.sampling import SamplingParams
from engine.tiers import FakeStore, TierConfig, TierManager
from engine.tiers.mooncake_store import (MooncakeMaster, MooncakeStoreBackend, StoreUnavailable,
                                         store_unavailable_reason)
from engine.tiers.record import record_bytes
from engine.tokenizer import Message

REASON = store_unavailable_reason()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def master(tmp_path_factory):
    if REASON is not None:
        pytest.skip(REASON)
    m = MooncakeMaster(free_port(), free_port(), free_port(), log_path=tmp_path_factory.mktemp("mc") / "master.log")
    m.start()
    yield m
    m.stop()
    assert m.proc.poll() is not None


def connect(master: MooncakeMaster, segment_mb: int = 64) -> MooncakeStoreBackend:
    return MooncakeStoreBackend.connect(local_host="127.0.0.1", master=master.address, metadata=master.metadata_url,
                                        segment_bytes=segment_mb << 20)


def test_mooncake_backend_round_trip(master):
    import numpy as np

    store = connect(master, 16)
    buf = np.zeros(3 << 20, dtype=np.uint8)
    buf[: 1 << 20] = np.arange(1 << 20, dtype=np.uint64).astype(np.uint8)
    a = buf.ctypes.data
    store.register(a, buf.nbytes)
    n = 1 << 20
    assert store.put_from(["t/a", "t/b"], [a, a], [n, n]) == [0, 0]
    assert store.put_from(["t/a"], [a], [n]) == [0]  # an existing key: kept, not an error
    assert store.exists(["t/a", "t/b", "t/none"]) == [True, True, False]
    assert store.get_into(["t/a", "t/none"], [a + n, a + 2 * n], [n, n])[0] == n
    assert (buf[n:2 * n] == buf[:n]).all()
    assert store.get_into(["t/none"], [a + 2 * n], [n])[0] < 0
    time.sleep(0.3)  # past the read's lease
    assert store.remove("t/a") == 0 and store.exists(["t/a"]) == [False]
    store.close()


def test_an_absent_master_is_refused_at_once_with_the_reason():
    port = free_port()
    t0 = time.monotonic()
    with pytest.raises(StoreUnavailable) as e:
        MooncakeStoreBackend.connect(local_host="127.0.0.1", master=f"127.0.0.1:{port}",
                                     metadata=f"http://127.0.0.1:{free_port()}/metadata", segment_bytes=1 << 20)
    assert time.monotonic() - t0 < 5  # not Mooncake's own 90 s of retries
    assert (f"127.0.0.1:{port} does not answer" in str(e.value)) or "does not load" in str(e.value)


def test_real_model_tokens_identical_from_every_tier_and_without_caching(real_model_dir, tmp_path, request):
    real = REASON is None
    if real:
        m = request.getfixturevalue("master")
        store_factory = lambda: connect(m)  # noqa: E731
    else:
        fake = FakeStore()
        store_factory = lambda: fake  # noqa: E731
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    eng = LLMEngine(real_model_dir, EngineConfig(num_blocks=64))
    prompt = eng.tokenizer.encode_chat([
        Message("system", "You are a careful assistant. Answer in one short sentence, and never repeat the "
                          "question. " * 4),
        Message("user", "Which planet is known as the red planet?")])
    full = (len(prompt) - 1) // 16 * 16  # the prefix any tier can serve (the last token is always computed)
    assert full >= 64
    want = LLMEngine(real_model_dir, EngineConfig(num_blocks=64)).generate([prompt], params)[0]  # no caching
    rb = record_bytes(eng.kv.block_bytes, 16)
    cfg = TierConfig(host_gib=32 * rb / (1 << 30), disk_gib=32 * rb / (1 << 30), disk_dir=str(tmp_path / "kv"),
                     store=True)
    tiers = TierManager.attach(eng, cfg, store=store_factory)

    def evict_device():
        eng.pool.free(eng.pool.allocate(eng.pool.num_free))
        assert tiers.flush()

    assert eng.generate([prompt], params)[0] == want  # computed
    assert eng.generate([prompt], params)[0] == want  # device
    evict_device()
    assert eng.generate([prompt], params)[0] == want  # host
    evict_device()
    tiers.spill_host()
    assert tiers.flush()
    assert eng.generate([prompt], params)[0] == want  # disk
    evict_device()
    tiers.spill_host()
    assert tiers.flush()
    tiers.disk.clear()
    assert eng.generate([prompt], params)[0] == want  # cluster
    st = tiers.stats()
    assert st.hit_tokens == {"device": full, "host": full, "disk": full, "cluster": full}
    assert st.store_state == "up" and st.events.get("put_failures", 0) == 0
    assert tiers.problems() == []
    tiers.close()
