"""The compiled simulator core (`bench.sim.native`): a build is used only while it matches
the source, and the compiled core decides exactly as the source does."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from bench.sim import native


def _manifest(tmp_path, **override):
    data = {"modules": {m: native.digest(native.source_of(m)) for m in native.MODULES}, "group": "g__mypyc",
            "abi": native._abi(), "mypy": "x", "built_s": 1.0, "built_at": "now"}
    data.update(override)
    (tmp_path / native.MANIFEST).write_text(json.dumps(data), encoding="utf-8")
    return data


def test_no_build_is_named_with_the_command_that_makes_one(tmp_path):
    with pytest.raises(native.NativeError, match="no compiled build .*python -m bench.sim.native build"):
        native.load_manifest(tmp_path)


def test_a_build_whose_source_changed_since_is_refused_naming_the_file(tmp_path):
    data = _manifest(tmp_path)
    assert native.load_manifest(tmp_path)["modules"] == data["modules"]
    changed = dict(data["modules"], **{"conductor.policies": "0" * 64})
    _manifest(tmp_path, modules=changed)
    with pytest.raises(native.NativeError, match=r"stale: conductor/policies\.py changed since"):
        native.load_manifest(tmp_path)


def test_a_build_for_another_python_or_module_set_is_refused(tmp_path):
    _manifest(tmp_path, abi="cpython-39-linux")
    with pytest.raises(native.NativeError, match="is for cpython-39-linux"):
        native.load_manifest(tmp_path)
    data = _manifest(tmp_path)
    del data["modules"]["bench.sim.nodes"]
    _manifest(tmp_path, modules=data["modules"])
    with pytest.raises(native.NativeError, match="another module set"):
        native.load_manifest(tmp_path)


def test_a_process_that_already_imported_the_source_core_is_not_switched_half_way(tmp_path):
    import bench.sim.cluster  # noqa: F401  (this test process runs the source)

    _manifest(tmp_path)
    with pytest.raises(native.NativeError, match="already imported from source: bench.sim.cluster"):
        native.install(tmp_path)
    assert native.compiled() == []


def test_the_cli_reports_a_missing_build_as_a_usage_error(tmp_path, capsys):
    assert native.main(["--dir", str(tmp_path), "run", "bench.sim.scale"]) == 2
    assert "no compiled build" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_compiled_core_is_built_and_decides_as_the_source_does(tmp_path):
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler: the compiled core cannot be built here")
    out = tmp_path / "native"
    manifest = native.build(out, quiet=True)
    assert set(manifest["modules"]) == set(native.MODULES)
    probe = ("import sys; from bench.sim import native; native.install(sys.argv[1]); "
             "import bench.sim.cluster, bench.sim.scale; print(len(native.compiled()))")
    done = subprocess.run([sys.executable, "-c", probe, str(out)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(len(native.MODULES))]
    # every golden decision fingerprint, replayed on the compiled core
    done = subprocess.run([sys.executable, "-m", "bench.sim.native", "--dir", str(out), "run", "bench.sim.fingerprint",
                           "--check"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = [line for line in done.stdout.splitlines() if line.rstrip().endswith(("ok", "DIFFERS"))]
    assert rows and all(line.rstrip().endswith("ok") for line in rows), done.stdout
    scale = subprocess.run([sys.executable, "-m", "bench.sim.native", "--dir", str(out), "run", "bench.sim.scale",
                            "--requests", "300", "--nodes", "8", "--json", str(tmp_path / "scale.json")],
                           capture_output=True, text=True, timeout=300)
    assert scale.returncode == 0, scale.stderr
    assert json.loads((tmp_path / "scale.json").read_text())["core"] == "compiled (mypyc)"
