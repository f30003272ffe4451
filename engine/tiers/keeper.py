"""The store keeper: a process beside the Mooncake master that mounts the cluster store's
memory, so blocks put there outlive any node (a node killed with its own segment would take
the objects in it along). `MooncakeMaster(keeper_gb=...)` runs it; it prints ``ready`` once
mounted and holds the segment until SIGTERM.

    python -m engine.tiers.keeper --master 127.0.0.1:50090 \\
        --metadata http://127.0.0.1:50091/metadata --segment-gb 1
"""
from __future__ import annotations

import argparse
import signal
import sys
import threading


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m engine.tiers.keeper")
    ap.add_argument("--master", required=True)
    ap.add_argument("--metadata", required=True)
    ap.add_argument("--segment-gb", type=float, required=True)
    ap.add_argument("--host", default="127.0.0.1")
    args = ap.parse_args(argv)
    from engine.tiers.mooncake_store import MooncakeStoreBackend, StoreUnavailable

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        store = MooncakeStoreBackend.connect(local_host=args.host, master=args.master, metadata=args.metadata,
                                             segment_bytes=int(args.segment_gb * (1 << 30)), local_buffer_bytes=0)
    except StoreUnavailable as e:
        print(f"error: {e}", flush=True)
        return 1
    print("ready", flush=True)
    stop.wait()
    store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
