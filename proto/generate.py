"""Regenerate the Python code for proto/halfmoon/v1/*.proto: `python -m proto.generate`.

Paths are relative to the repository root, so generated modules import each other as
`proto.halfmoon.v1.<name>_pb2`. `tests/proto/test_generated.py` checks that the checked-in
code matches what this produces.
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = Path("proto/halfmoon/v1")


def generate(out_dir: Path = ROOT) -> list[Path]:
    import grpc_tools
    from grpc_tools import protoc

    files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / PROTO_DIR).glob("*.proto"))
    include = str(Path(grpc_tools.__file__).parent / "_proto")
    args = ["protoc", f"-I{ROOT}", f"-I{include}", f"--python_out={out_dir}", f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}", *files]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")
    return sorted((out_dir / PROTO_DIR).glob("*_pb2*.py*"))


if __name__ == "__main__":
    for p in generate():
        print(p.relative_to(ROOT) if p.is_relative_to(ROOT) else p)
    sys.exit(0)
