from proto.generate import PROTO_DIR, ROOT, generate


def test_checked_in_code_matches_the_proto_files(tmp_path):
    fresh = generate(tmp_path)
    assert fresh, "protoc produced nothing"
    for f in fresh:
        checked_in = ROOT / PROTO_DIR / f.name
        assert checked_in.is_file(), f"{f.name} is not checked in: run python -m proto.generate"
        assert checked_in.read_text() == f.read_text(), f"{f.name} is stale: run python -m proto.generate"
    names = {f.name for f in fresh}
    stale = {p.name for p in (ROOT / PROTO_DIR).glob("*_pb2*.py*")} - names
    assert not stale, f"generated files without a .proto: {stale}"
