"""The README's operator commands, read out of README.md, run one after another as an
operator's shell would: `export`s carry over, each command gets a deadline, and every
process any of them started (Ray's daemons included) is stopped by PID afterwards."""
from __future__ import annotations

import os
import re
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ray_helpers import session_processes, stop_processes

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"


def readme_block(section: str, containing: str) -> list[str]:
    """The commands of the ```bash block under README heading `section` that contains
    `containing`: one per logical line (backslash continuations joined), comments kept."""
    text = README.read_text(encoding="utf-8")
    start = text.index(f"\n{section}\n")
    end = text.find("\n## ", start + 1)
    body = text[start:end if end != -1 else None]
    blocks = [b for b in re.findall(r"```bash\n(.*?)```", body, re.S) if containing in b]
    assert len(blocks) == 1, f"README {section!r}: expected one bash block with {containing!r}, found {len(blocks)}"
    commands, pending = [], ""
    for line in blocks[0].splitlines():
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        command = (pending + line).strip()
        pending = ""
        if command and not command.startswith("#"):
            commands.append(command)
    return commands


def fresh_env(home: Path, ray_tmp: str) -> dict[str, str]:
    """This process's environment as a new operator's shell would have it: no Ray or
    halfmoon settings (the test conftest sets some), a HOME of its own, Ray's session files
    in a private temp dir (so `auto` never finds another test's cluster), and the model
    cache of this checkout (so the model is not unpacked again)."""
    cache = os.environ.get("HALFMOON_CACHE") or str(Path.home() / ".cache" / "halfmoon")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "HALFMOON_"))}
    env.update(HOME=str(home), RAY_TMPDIR=str(ray_tmp), HALFMOON_CACHE=cache, PWD=str(REPO))
    return env


@dataclass
class Ran:
    command: str
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    def __str__(self) -> str:
        return (f"$ {self.command}\n(exit {self.returncode} after {self.seconds:.1f}s)\n"
                f"--- stdout ---\n{self.stdout[-4000:]}\n--- stderr ---\n{self.stderr[-4000:]}")


class Shell:
    """Runs commands with bash in the repository root, each in a session of its own; the
    environment each one leaves (`export`) is the next one's."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.sids: list[int] = []
        self._env_file = Path(tempfile.mkstemp(prefix="hm-readme-env-")[1])

    def run(self, command: str, timeout_s: float) -> Ran:
        script = f'{command}\n__hm_rc=$?\nenv -0 > "{self._env_file}"\nexit $__hm_rc\n'
        started = time.monotonic()
        proc = subprocess.Popen(["bash", "-c", script], cwd=REPO, env=self.env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        self.sids.append(proc.pid)
        try:
            out, err = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            stop_processes(session_processes(proc.pid), grace_s=5)
            out, err = proc.communicate()
            return Ran(command, -9, out, err + f"\n[killed: still running after {timeout_s:.0f}s]",
                       time.monotonic() - started)
        ran = Ran(command, proc.returncode, out, err, time.monotonic() - started)
        left = self._env_file.read_bytes().split(b"\0") if self._env_file.stat().st_size else []
        env = dict(item.decode().split("=", 1) for item in left if b"=" in item)
        if env:
            self.env = {k: v for k, v in env.items() if k not in ("_", "SHLVL", "OLDPWD")}
        return ran

    def processes(self) -> list:
        seen = {}
        for sid in self.sids:
            seen.update({p.pid: p for p in session_processes(sid)})
        return list(seen.values())

    def stop(self) -> None:
        """What `ray stop` would do for these commands alone: end every process they started."""
        stop_processes(self.processes())
        self._env_file.unlink(missing_ok=True)
