"""The simulator's decisions and outcomes stay bit-identical: every seeded case of
`bench.sim.fingerprint` hashes to what `tests/bench/sim_fingerprints.json` holds. A speed-up
of the simulator or of the conductor's core must not change them; a change meant to change
decisions regenerates the file (`python -m bench.sim.fingerprint --update`) and says so."""
from __future__ import annotations

import json

import pytest

from bench.sim.fingerprint import CASES, GOLDEN, Case, fingerprint, run_case

GOLDEN_HASHES = json.loads(GOLDEN.read_text())


def test_every_case_has_a_recorded_hash():
    assert sorted(GOLDEN_HASHES) == sorted(c.name for c in CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_a_seeded_run_hashes_as_recorded(case: Case):
    assert fingerprint(run_case(case)) == GOLDEN_HASHES[case.name]


def test_the_hash_sees_a_single_changed_outcome():
    run = run_case(CASES[0])
    before = fingerprint(run)
    st = run.states[len(run.states) // 2]
    st.finish_s = float.fromhex(st.finish_s.hex()) + 1e-9
    assert fingerprint(run) != before
