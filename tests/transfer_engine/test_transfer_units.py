"""In-process units: the batch handle's state machine, the wire header, descriptors,
memory registration, batch planning."""

from __future__ import annotations

import asyncio
import mmap
import os
import threading

import numpy as np
import pytest

from transfer_engine import (
    DescriptorError,
    PeerDescriptor,
    ProtocolError,
    RegionInfo,
    RegistrationError,
    TransferCancelled,
    TransferOp,
    TransferRefused,
    TransferState,
    TransferTimeout,
    WaitTimeout,
)
from transfer_engine import protocol as wire
from transfer_engine.batch import coalesce
from transfer_engine.handle import TransferHandle
from transfer_engine.memory import RegionTable, byte_array, sweep_stale_segments
from transfer_engine.protocol import FrameKind, Status
from transfer_engine.records import RegionId
from transfer_engine.tcp import plan_frames
from transfer_engine.transport import Piece


def new_handle(parts: int = 1) -> TransferHandle:
    handle = TransferHandle(TransferOp.WRITE, "peer", 100, 1)
    handle._set_parts(parts)
    return handle


# --- handle ---


def test_handle_is_done_only_when_every_part_is():
    handle = new_handle(parts=3)
    assert handle.poll() is TransferState.PENDING
    assert handle._start() and handle.poll() is TransferState.RUNNING
    handle._part_done()
    handle._part_done()
    assert handle.poll() is TransferState.RUNNING
    handle._part_done()
    assert handle.poll() is TransferState.DONE
    handle.wait(0)


def test_first_ending_wins_and_callbacks_run_once():
    seen = []
    done = new_handle()
    done.add_done_callback(lambda h: seen.append(("done", h.poll())))
    done._part_done()
    assert done.cancel() is False
    assert done._fail(TransferRefused("late")) is False
    assert done.poll() is TransferState.DONE and done.error is None

    failed = new_handle()
    failed.add_done_callback(lambda h: seen.append(("failed", h.poll())))
    failed._fail(TransferRefused("no such region"))
    failed._part_done()
    assert failed.cancel() is False
    assert failed.poll() is TransferState.FAILED
    with pytest.raises(TransferRefused, match="no such region"):
        failed.wait(0)
    failed.add_done_callback(lambda h: seen.append(("late callback", h.poll())))
    assert seen == [("done", TransferState.DONE), ("failed", TransferState.FAILED),
                    ("late callback", TransferState.FAILED)]


def test_cancel_and_wait_timeout():
    handle = new_handle()
    with pytest.raises(WaitTimeout):
        handle.wait(0.01)
    assert handle.cancel() is True
    assert handle._start() is False  # transports skip cancelled work
    with pytest.raises(TransferCancelled):
        handle.wait(0)


def test_deadline_watch_keeps_only_batches_in_flight_and_still_times_out():
    from transfer_engine.deadlines import DeadlineWatch

    watch = DeadlineWatch("units")
    try:
        slow = new_handle()
        watch.watch(slow, 0.3)  # never completes: must time out
        for _ in range(1000):  # a stream of batches that end before the next is submitted
            handle = new_handle()
            watch.watch(handle, 30.0)
            handle._part_done()
        assert len(watch._heap) <= 64  # ended batches are dropped, not kept for 30 s
        with pytest.raises(TransferTimeout, match="within its 0.3s timeout"):
            slow.wait(5)
        late = new_handle()
        watch.watch(late, 0.2)  # earlier than anything the thread sleeps for: it is woken
        with pytest.raises(TransferTimeout):
            late.wait(5)
    finally:
        watch.close()


def test_await_from_another_thread_and_cancel_on_task_cancel():
    async def finished_elsewhere() -> TransferState:
        handle = new_handle()
        threading.Timer(0.02, handle._part_done).start()
        await handle
        return handle.poll()

    assert asyncio.run(finished_elsewhere()) is TransferState.DONE

    async def abandoned() -> TransferHandle:
        handle = new_handle()
        task = asyncio.ensure_future(_await(handle))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return handle

    assert asyncio.run(abandoned()).poll() is TransferState.CANCELLED


async def _await(handle: TransferHandle) -> None:
    await handle


# --- wire ---


def test_header_round_trip_and_rejections():
    raw = wire.pack_header(FrameKind.ACK, frame_id=2**40, body_len=7, payload_len=2**33, status=Status.REFUSED)
    assert len(raw) == 28
    header = wire.unpack_header(raw)
    assert (header.kind, header.status, header.frame_id, header.body_len, header.payload_len) == (
        FrameKind.ACK, Status.REFUSED, 2**40, 7, 2**33)
    with pytest.raises(ProtocolError, match="magic"):
        wire.unpack_header(b"XXXX" + raw[4:])
    with pytest.raises(ProtocolError, match="version"):
        wire.unpack_header(raw[:4] + bytes([9]) + raw[5:])
    with pytest.raises(ProtocolError, match="exceeds"):
        wire.unpack_header(wire.pack_header(FrameKind.WRITE, body_len=wire.MAX_BODY_BYTES + 1))
    entries = [wire.WireEntry(1, 2, 3), wire.WireEntry(2**63, 0, 1)]
    assert wire.unpack_entries(wire.pack_entries(entries)) == entries
    with pytest.raises(ProtocolError):
        wire.unpack_entries(b"\0" * 25)


def test_hmac_authentication():
    nonce = os.urandom(16)
    mac = wire.auth_mac("tok", nonce, "seg")
    assert wire.mac_ok("tok", nonce, "seg", mac)
    assert not wire.mac_ok("tok", nonce, "other-seg", mac)
    assert not wire.mac_ok("tok", os.urandom(16), "seg", mac)
    assert not wire.mac_ok("tok", nonce, "seg", wire.auth_mac(None, nonce, "seg"))
    assert wire.mac_ok(None, nonce, "seg", b"anything")  # no token: open to all


def test_descriptor_bytes_round_trip_and_garbage():
    desc = PeerDescriptor("decode-0", "10.0.0.7", 5555, "host/boot/1",
                          (RegionInfo(RegionId(1), 4096, False, "hm-te-x", None), RegionInfo(RegionId(2), 8, True, None, 1234)),
                          "10.0.0.7:17000")
    assert PeerDescriptor.from_bytes(desc.to_bytes()) == desc
    assert desc.region(2).addr == 1234 and desc.region(3) is None
    with pytest.raises(DescriptorError):
        PeerDescriptor.from_bytes(b"not json")
    with pytest.raises(DescriptorError, match="version 99"):
        PeerDescriptor.from_bytes(desc.to_bytes().replace(b'"version":1', b'"version":99'))


# --- memory ---


def test_byte_array_shares_memory_with_every_kind_of_buffer():
    torch = pytest.importorskip("torch")
    tensor = torch.zeros(4, 8, dtype=torch.bfloat16)
    arr, readonly = byte_array(tensor)
    arr[:2] = [0x80, 0x3F]  # bfloat16 1.0, little-endian
    assert tensor[0, 0].item() == 1.0 and not readonly and arr.nbytes == 64

    nd = np.zeros((3, 5), dtype=np.float64)
    byte_array(nd)[0][...] = 1
    assert nd.view(np.uint8)[0, 0] == 1

    buf = bytearray(10)
    byte_array(buf)[0][3] = 7
    assert buf[3] == 7
    mapping = mmap.mmap(-1, 4096)
    assert byte_array(mapping)[0].nbytes == 4096
    assert byte_array(b"constant")[1] is True

    with pytest.raises(RegistrationError, match="not contiguous"):
        byte_array(tensor.t())
    with pytest.raises(RegistrationError, match="not C-contiguous"):
        byte_array(nd[:, ::2])
    with pytest.raises(RegistrationError, match="no buffer"):
        byte_array(object())
    with pytest.raises(RegistrationError, match="empty"):
        RegionTable().add(np.zeros(0, dtype=np.uint8), False, None)


def test_region_table_checks():
    table = RegionTable()
    region = table.add(np.zeros(100, dtype=np.uint8), False, None)
    frozen = table.add(np.zeros(100, dtype=np.uint8), True, None)
    assert table.check(region.id, 0, 100, writing=True) == (region, None)
    assert table.check(region.id, 1, 100, writing=True)[1] == f"range [1, 101) is out of bounds of region {region.id} (100 bytes)"
    assert table.check(99, 0, 1, writing=False)[1] == "unknown region 99"
    assert table.check(frozen.id, 0, 1, writing=True)[1] == f"region {frozen.id} is read-only"
    assert table.check(frozen.id, 0, 1, writing=False) == (frozen, None)


def test_allocate_tensor_is_shared_memory_unlinked_on_close(make_engine):
    torch = pytest.importorskip("torch")
    engine = make_engine("alloc")
    region, kv = engine.allocate_tensor((3, 30, 2, 16, 3, 64), torch.float32)
    assert region.size == 3 * 737_280 and kv.dtype == torch.float32 and kv.is_contiguous()
    (info,) = engine.descriptor().regions
    assert info.shm_name and os.path.exists(f"/dev/shm/{info.shm_name}")
    engine.close()
    assert not os.path.exists(f"/dev/shm/{info.shm_name}")


def test_stale_segments_of_dead_processes_are_swept():
    name = "hm-te-ghost-999999999-abcdef"  # no such pid
    with open(f"/dev/shm/{name}", "wb") as f:
        f.write(b"x")
    assert name in sweep_stale_segments()
    assert not os.path.exists(f"/dev/shm/{name}")


# --- batch planning ---


def test_coalesce_merges_only_runs_contiguous_on_both_sides():
    table = RegionTable()
    a = table.add(np.zeros(1000, dtype=np.uint8), False, None)
    b = table.add(np.zeros(1000, dtype=np.uint8), False, None)
    pieces = [Piece(a, 0, RegionId(1), 100, 10), Piece(a, 10, RegionId(1), 110, 10),  # merge
              Piece(a, 20, RegionId(1), 200, 10),  # remote gap
              Piece(b, 30, RegionId(1), 210, 10),  # other local region
              Piece(b, 40, RegionId(2), 220, 10)]  # other remote region
    merged = coalesce(pieces)
    assert [(p.local is a, p.local_offset, p.remote_id, p.remote_offset, p.length) for p in merged] == [
        (True, 0, 1, 100, 20), (True, 20, 1, 200, 10), (False, 30, 1, 210, 10), (False, 40, 2, 220, 10)]


def test_frames_split_big_pieces_and_pack_small_ones():
    region = RegionTable().add(np.zeros(1000, dtype=np.uint8), False, None)
    handle = new_handle()
    frames = plan_frames(TransferOp.WRITE, handle, [Piece(region, 0, RegionId(5), 0, 250),
                                                    Piece(region, 300, RegionId(5), 900, 30)], frame_bytes=100)
    assert [f.nbytes for f in frames] == [100, 100, 80]
    assert [(p.local_offset, p.remote_offset, p.length) for p in frames[1].pieces] == [(100, 100, 100)]
    assert [(p.local_offset, p.remote_offset, p.length) for p in frames[2].pieces] == [(200, 200, 50), (300, 900, 30)]


def test_mooncake_missing_is_a_clear_error(monkeypatch):
    import importlib

    from transfer_engine import TransferEngine, TransportUnavailable, mooncake_unavailable_reason

    real = importlib.import_module

    def no_mooncake(name, *args, **kwargs):
        if name.startswith("mooncake"):
            raise ImportError(f"No module named {name!r}")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(importlib, "import_module", no_mooncake)
    reason = mooncake_unavailable_reason()
    assert reason is not None and "install-mooncake.sh" in reason
    with pytest.raises(TransportUnavailable, match="mooncake-transfer-engine-non-cuda"):
        TransferEngine("no-moon", transport="mooncake")
