"""README "Running on Ray": the operator walk-through, run exactly as README.md shows it
(the commands are read out of its bash block, so this breaks when the README drifts), in a
fresh shell environment: no Ray settings, a HOME of its own.

`ray stop`, the block's last command, stops every Ray process on the machine (other tests'
clusters too), so the test ends the processes its own commands started instead, by PID."""
from __future__ import annotations

import ipaddress
import os
import re
import secrets
import shutil
import socket
import tempfile

import psutil
import pytest
from readme_shell import Shell, fresh_env, readme_block

pytestmark = [pytest.mark.slow, pytest.mark.real_model]

SECTION, MARK = "## Running on Ray", "ray start --head"
# The fixed ports the walk-through uses: Ray's defaults and deploy/2p2d.yaml's conductor.
PORTS = {6379: "Ray GCS", 8265: "Ray dashboard", 10001: "Ray Client server",
         50051: "conductor gRPC", 8000: "conductor HTTP"}
LIMITS_S = {"ray start": 120, "ray job submit": 300, "halfmoon generate": 120, "halfmoon status": 20,
            "halfmoon down": 40, "ray get-auth-token": 30, "export": 10}
NODES = ("prefill-0", "prefill-1", "decode-0", "decode-1")
# Mooncake Store (the cluster KV tier, whose master `halfmoon up` runs as an actor) binds the
# wildcard whatever it is told in this wheel: mooncake_master's HTTP metadata server ignores
# -http_metadata_server_host, and every store client's transfer engine listens for its RPC on
# a port of [MC_MIN_RPC_PORT, MC_MAX_RPC_PORT] (default 15000-17000) on 0.0.0.0 / ::
# (MC_TCP_BIND_ADDRESS does not change it). A known gap of the store, not of halfmoon's own
# servers, which must stay on loopback.
MOONCAKE_RPC_PORTS = range(15000, 17001)


def busy(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def limit(command: str) -> float:
    for prefix, seconds in LIMITS_S.items():
        if prefix in command:
            return seconds
    raise AssertionError(f"no time limit for README command {command!r}; add one to LIMITS_S")


def loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip)
    return (getattr(addr, "ipv4_mapped", None) or addr).is_loopback


def listeners(procs: list) -> list[tuple[int, str, str]]:
    """(pid, process name, bound ip) of every TCP listener of `procs`, less Mooncake Store's
    (`MOONCAKE_RPC_PORTS`)."""
    out = []
    for p in procs:
        try:
            if p.name() == "mooncake_master":
                continue
            out += [(p.pid, p.name(), c.laddr.ip) for c in p.net_connections(kind="inet")
                    if c.status == psutil.CONN_LISTEN and c.laddr.port not in MOONCAKE_RPC_PORTS]
        except psutil.Error:
            pass
    return out


@pytest.fixture
def shell(tmp_path):
    taken = [f"{port} ({what})" for port, what in PORTS.items() if busy(port)]
    if taken:
        pytest.skip(f"the README's Ray walk-through needs ports in use here: {', '.join(taken)}")
    home = tmp_path / "home"
    home.mkdir()
    ray_tmp = tempfile.mkdtemp(prefix="hmr-", dir="/tmp")  # short: Ray's socket paths must fit
    sh = Shell(fresh_env(home, ray_tmp))
    try:
        yield sh
    finally:
        sh.stop()
        shutil.rmtree(ray_tmp, ignore_errors=True)
        assert sh.processes() == [], "processes started by the README's commands survived"


def test_readme_commands_cover_the_walk_through():
    commands = readme_block(SECTION, MARK)
    assert commands[-1] == "ray stop", commands
    for needed in ("ray start --head", "ray job submit", "halfmoon up --config", "halfmoon generate",
                   "halfmoon status", "halfmoon down --config"):
        assert any(needed in c for c in commands), f"README walk-through lost {needed!r}: {commands}"


def test_readme_ray_walk_through_runs_as_written(shell):
    """After a local `ray.init()` (e.g. `make serve`) left a token in ~/.ray, `ray start`
    turns token auth on: the block must still work from `ray job submit` to `halfmoon down`,
    on loopback only, and `down` must return promptly."""
    token_dir = shell.env["HOME"] + "/.ray"
    os.makedirs(token_dir)
    with open(token_dir + "/auth_token", "w") as f:
        f.write(secrets.token_hex(32))
    *commands, last = readme_block(SECTION, MARK)
    assert last == "ray stop"
    for command in commands:
        ran = shell.run(command, limit(command))
        assert ran.returncode == 0, str(ran)
        if "ray job submit" in command:
            assert "succeeded" in ran.stdout and "gRPC 127.0.0.1:50051" in ran.stdout, str(ran)
            bound = listeners(shell.processes())
            outward = [b for b in bound if not loopback(b[2])]
            assert bound and not outward, f"listening beyond loopback: {outward}"
        elif "halfmoon generate" in command:
            assert "Paris" in ran.stdout, str(ran)
        elif "halfmoon status" in command:
            for node in NODES:
                assert re.search(rf"{node}\b.*\bup\b", ran.stdout), f"{node} not up:\n{ran}"
        elif "halfmoon down" in command:
            assert ran.seconds < 30, str(ran)
            assert ran.stdout.strip().endswith(
                "stopped halfmoon-decode-0, halfmoon-decode-1, halfmoon-prefill-0, halfmoon-prefill-1, "
                "halfmoon-store-master, halfmoon-conductor"), str(ran)
            assert not busy(50051), "the conductor still listens after `halfmoon down`"


def test_readme_ray_set_up_on_a_fresh_machine_turns_token_auth_on(shell):
    """With no token anywhere, the block's set-up makes one and starts a token-auth head that
    `halfmoon down` joins; a shell without the token is refused within seconds, by name."""
    commands = readme_block(SECTION, MARK)
    set_up = commands[:next(i for i, c in enumerate(commands) if "ray job submit" in c)]
    (down,) = [c for c in commands if c.startswith("halfmoon down")]
    for command in set_up + [down]:
        ran = shell.run(command, limit(command))
        assert ran.returncode == 0, str(ran)
    assert "nothing of halfmoon runs in Ray namespace 'halfmoon'" in ran.stdout, str(ran)

    stranger = Shell({**shell.env, "HOME": shell.env["HOME"] + "/stranger"})
    stranger.env.pop("RAY_AUTH_MODE")
    refused = stranger.run(down, 15)
    stranger.stop()
    assert refused.returncode == 1 and refused.seconds < 10, str(refused)
    assert "error: the Ray cluster at 127.0.0.1:6379 requires token authentication" in refused.stderr, str(refused)
