"""Tuning knobs of a transfer engine, validated once."""

from __future__ import annotations

from dataclasses import dataclass

MiB = 1 << 20


@dataclass(frozen=True)
class EngineConfig:
    default_timeout_s: float | None = 30.0  # per-batch timeout when write/read give none
    connect_timeout_s: float = 5.0  # TCP connect + handshake
    streams: int = 2  # TCP connections per peer; large batches are striped across them
    stripe_min_bytes: int = 32 * MiB  # batches at least this big are striped
    max_frame_bytes: int = 8 * MiB  # payload per TCP frame: acknowledgement and cancellation granularity
    shm_copy_chunk_bytes: int = 64 * MiB  # shm copies check for cancellation this often
    # batches up to this size are sent (TCP) or copied (shm) by the calling thread when
    # the connection is idle, saving a thread hand-off; write() then returns once the
    # bytes are in the kernel (TCP) or copied (shm). 0 turns this off.
    inline_max_bytes: int = 4 * MiB
    mooncake_protocol: str = "tcp"  # "tcp" here, "rdma" on clusters with RDMA NICs
    mooncake_window_bytes: int = 256 * MiB  # bytes a Mooncake batch keeps submitted at once

    def __post_init__(self) -> None:
        if self.default_timeout_s is not None and self.default_timeout_s <= 0:
            raise ValueError(f"default_timeout_s must be positive or None, not {self.default_timeout_s}")
        if self.connect_timeout_s <= 0:
            raise ValueError(f"connect_timeout_s must be positive, not {self.connect_timeout_s}")
        if not 1 <= self.streams <= 64:
            raise ValueError(f"streams must be within 1..64, not {self.streams}")
        for name in ("stripe_min_bytes", "max_frame_bytes", "shm_copy_chunk_bytes", "mooncake_window_bytes"):
            if getattr(self, name) < 4096:
                raise ValueError(f"{name} must be at least 4096 bytes, not {getattr(self, name)}")
        if self.inline_max_bytes < 0:
            raise ValueError(f"inline_max_bytes must not be negative, not {self.inline_max_bytes}")
        if self.mooncake_protocol not in ("tcp", "rdma"):
            raise ValueError(f"mooncake_protocol must be 'tcp' or 'rdma', not {self.mooncake_protocol!r}")
