"""The simulator's core compiled with mypyc: the same source files, run as C extensions.

    python -m bench.sim.native build                      # compile (about a minute)
    python -m bench.sim.native run bench.sim.scale --requests 1000000 --nodes 4096
    python -m bench.sim.native status                     # what is built, and is it current

`build` compiles `MODULES` (the discrete-event loop, its nodes, and the conductor's core that
every decision and view change goes through: scheduler, policies, admission, cluster state,
prefix index, cost model) with mypyc into `build/sim-native/`, outside the source tree, and
records each source file's SHA-256 beside them. `run PROGRAM ARGS...` runs a program (any
module with a `__main__` block, e.g. `bench.sim.scale`, `bench.sim.fingerprint`) with an
import finder in front that loads those modules from the build and everything else from the
tree as usual. It refuses a build whose sources changed since (naming the file), so a run
never mixes an edited source with its old compiled form.

What compiling changes: speed only. The decisions are the same; `python -m bench.sim.native
run bench.sim.fingerprint --check` replays the decision fingerprints on the compiled core,
and a test does so after building. What it cannot do: compiled classes cannot be
monkeypatched, nor subclassed from Python except `Simulation` (the tiered and elastic
simulations subclass it and run compiled), and a compiled simulation cannot fork (its objects
have no `__dict__` to deep-copy), so counterfactual judging (`bench.sim.counterfactual`,
`bench.sim.threshold`, admission precision) needs the source core and says so. That is why
the test suite runs on the source, and why this is opt-in.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import runpy
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DIR = ROOT / "build" / "sim-native"
MANIFEST = "manifest.json"

# Everything one simulated request passes through, and nothing that does I/O.
MODULES = (
    "bench.sim.cluster", "bench.sim.events", "bench.sim.load", "bench.sim.nodes",
    "conductor.admission", "conductor.cluster_state", "conductor.cost_model", "conductor.decision",
    "conductor.errors", "conductor.lifecycle", "conductor.modes", "conductor.policies",
    "conductor.predictions", "conductor.prefix_index", "conductor.request", "conductor.scheduler",
    "conductor.settings", "conductor.store_lru", "conductor.view", "engine.block_pool",
)
# mypy's view of the rest: imports from modules not compiled are opaque (`Any`) to it.
MYPY_FLAGS = ("--follow-imports=skip", "--ignore-missing-imports", "--disable-error-code=annotation-unchecked")


class NativeError(Exception):
    """The build is missing, stale, or for another Python."""


def source_of(module: str) -> Path:
    return ROOT / (module.replace(".", "/") + ".py")


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _abi() -> str:
    return f"{sys.implementation.cache_tag}-{sys.platform}"


def build(out: Path | str = DEFAULT_DIR, *, quiet: bool = False) -> dict:
    """Compile `MODULES` into `out` (replacing what is there); returns the manifest written."""
    out = Path(out)
    try:
        import mypy.version
    except ImportError:
        raise NativeError("mypyc is not installed: pip install mypy (it ships mypyc)") from None
    if shutil.which(os.environ.get("CC", "cc")) is None and shutil.which("gcc") is None:
        raise NativeError("no C compiler found (cc or gcc; or set CC)")
    sources = [source_of(m) for m in MODULES]
    hashes = {m: digest(p) for m, p in zip(MODULES, sources)}
    out = out.resolve()
    if out.exists():
        shutil.rmtree(out)
    work = out / "work"
    work.mkdir(parents=True)
    paths = [*MYPY_FLAGS, f"--cache-dir={work / 'mypy-cache'}", *(str(p.relative_to(ROOT)) for p in sources)]
    script = (
        "import sys\nfrom setuptools import setup\nfrom mypyc.build import mypycify\n"
        f"setup(name='halfmoon-sim-native', ext_modules=mypycify({paths!r}, opt_level='3', target_dir={str(work / 'c')!r}),"
        f" script_args=['build_ext', '--build-lib', {str(out)!r}, '--build-temp', {str(work / 'obj')!r}])\n"
    )
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        lines = [ln for ln in (done.stdout + done.stderr).splitlines()
                 if ln.strip() and not ln.startswith(("gcc ", "cc ", "building ", "copying ", "running "))]
        raise NativeError("mypyc failed:\n" + "\n".join(lines[-40:]))
    groups = sorted(p.name for p in out.glob("*__mypyc*"))
    if len(groups) != 1:
        raise NativeError(f"expected one mypyc runtime library in {out}, found {groups}")
    for m in MODULES:
        if _extension(out, m) is None:
            raise NativeError(f"mypyc built no extension for {m}")
    shutil.rmtree(work)
    manifest = {
        "modules": hashes, "group": groups[0].split(".")[0], "abi": _abi(),
        "mypy": mypy.version.__version__, "built_s": round(time.perf_counter() - t0, 1),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    if not quiet:
        print(f"compiled {len(MODULES)} modules with mypyc {manifest['mypy']} into {out} in {manifest['built_s']} s")
    return manifest


def _extension(out: Path, module: str) -> Path | None:
    base = out.joinpath(*module.split("."))
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = base.with_name(base.name + suffix)
        if path.exists():
            return path
    return None


def load_manifest(out: Path | str = DEFAULT_DIR) -> dict:
    """The build's manifest, checked against the tree: NativeError names what is wrong."""
    out = Path(out)
    path = out / MANIFEST
    if not path.exists():
        raise NativeError(f"no compiled build in {out}: run `python -m bench.sim.native build`")
    manifest = json.loads(path.read_text(encoding="utf-8"))
    if manifest.get("abi") != _abi():
        raise NativeError(f"the build in {out} is for {manifest.get('abi')}, this is {_abi()}: rebuild it")
    built = manifest.get("modules", {})
    if set(built) != set(MODULES):
        raise NativeError(f"the build in {out} compiled another module set: rebuild it")
    for m in MODULES:
        if built[m] != digest(source_of(m)):
            raise NativeError(f"the build in {out} is stale: {source_of(m).relative_to(ROOT)} changed since; rebuild it")
    return manifest


class _Finder(importlib.abc.MetaPathFinder):
    """Loads the compiled modules (and mypyc's runtime library) from the build directory."""

    def __init__(self, out: Path, group: str) -> None:
        self._paths = {m: _extension(out, m) for m in MODULES}
        self._paths[group] = _extension(out, group)

    def find_spec(self, fullname, path=None, target=None):
        where = self._paths.get(fullname)
        if where is None:
            return None
        loader = importlib.machinery.ExtensionFileLoader(fullname, str(where))
        return importlib.util.spec_from_file_location(fullname, where, loader=loader)


def install(out: Path | str = DEFAULT_DIR) -> dict:
    """Put the compiled modules in front of the tree's for this process; before any of them
    is imported (a module already imported from source stays what it is)."""
    out = Path(out)
    manifest = load_manifest(out)
    already = [m for m in MODULES if m in sys.modules and not _is_native(sys.modules[m])]
    if already:
        raise NativeError(f"already imported from source: {', '.join(already)}")
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder(out, manifest["group"]))
    return manifest


def _is_native(module) -> bool:
    return str(getattr(module, "__file__", "") or "").endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))


def compiled() -> list[str]:
    """The core modules this process runs compiled (empty on the source)."""
    return [m for m in MODULES if m in sys.modules and _is_native(sys.modules[m])]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.sim.native", description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="build directory (default build/sim-native)")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("build", help="compile the core with mypyc")
    sub.add_parser("status", help="is the build there and current")
    r = sub.add_parser("run", help="run PROGRAM (a module) on the compiled core")
    r.add_argument("program", help="a module to run as __main__, e.g. bench.sim.scale")
    r.add_argument("args", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    try:
        if args.command == "build":
            build(args.dir)
        elif args.command == "status":
            m = load_manifest(args.dir)
            print(f"{len(m['modules'])} modules compiled with mypyc {m['mypy']} at {m['built_at']} in {args.dir}: current")
        else:
            install(args.dir)
            sys.argv = [args.program, *args.args]
            runpy.run_module(args.program, run_name="__main__", alter_sys=True)
    except NativeError as e:
        print(f"{p.prog}: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
