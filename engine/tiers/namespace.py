"""The namespace of a node's KV blocks in the tiers below the device: a fingerprint of what
makes two nodes' blocks interchangeable (the model's files, the weight and KV dtypes, the
block size). Nodes with equal fingerprints share disk directories and store keys."""
from __future__ import annotations

from pathlib import Path

import xxhash


def kv_namespace(model_dir: Path, *, dtype: str, kv_dtype: str, block_size: int) -> str:
    """16 hex digits over config.json, the weight files' sizes and first MiB, and the layout."""
    x = xxhash.xxh64()
    model_dir = Path(model_dir)
    cfg = model_dir / "config.json"
    if cfg.is_file():
        x.update(cfg.read_bytes())
    for f in sorted(model_dir.glob("*.safetensors")):
        x.update(f"{f.name}:{f.stat().st_size}".encode())
        with open(f, "rb") as fh:
            x.update(fh.read(1 << 20))
    x.update(f"dtype={dtype};kv={kv_dtype};block={block_size}".encode())
    return x.hexdigest()
