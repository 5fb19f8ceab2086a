"""`meft train` under faults, as real processes (`fault_cases`): kill -9 at seeded random points of training
and of each checkpoint save, SIGTERM, a damaged file in each checkpoint part, `latest` naming a deleted
folder, two live runs into one folder, a second run into an occupied folder, a full disk. Every case
resumes (or refuses) and ends with the losses of an uninterrupted run, nothing lost or mixed."""

import pytest

from tests.meft.train import fault_cases as fc

TRAIN_SEEDS = range(10)
SAVE_SEEDS = range(10)
FAST = 3  # seeds of each kind that run without -m slow


@pytest.fixture(scope="module")
def ref(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    return root, fc.reference(tiny, root)


def _check(v: fc.Verdict):
    assert v.ok, f"{v.case}: {v.detail}"


@pytest.mark.parametrize("seed", [pytest.param(s, marks=[pytest.mark.slow] if s >= FAST else []) for s in TRAIN_SEEDS])
def test_kill_9_during_training_resumes_exactly(tiny, ref, seed):
    _check(fc.kill_in_training(tiny, ref[0], ref[1], seed))


@pytest.mark.parametrize("seed", [pytest.param(s, marks=[pytest.mark.slow] if s >= FAST else []) for s in SAVE_SEEDS])
def test_kill_9_during_a_save_resumes_exactly(tiny, ref, seed):
    _check(fc.kill_in_save(tiny, ref[0], ref[1], seed))


def test_sigterm_saves_and_exits_143(tiny, ref):
    _check(fc.sigterm(tiny, ref[0], ref[1]))


@pytest.mark.parametrize("part", ["stores.safetensors", "state.pt", "options.json", "manifest.json", "folder"])
def test_a_damaged_checkpoint_is_skipped(tiny, ref, part):
    _check(fc.damaged_part(tiny, ref[0], ref[1], part))


def test_second_run_into_an_occupied_folder_is_refused(tiny, ref):
    _check(fc.occupied_folder(tiny, ref[0], ref[1]))


def test_two_live_runs_into_one_folder(tiny, ref):
    _check(fc.concurrent_runs(tiny, ref[0], ref[1]))


def test_full_disk(tiny, ref):
    v = fc.full_disk(tiny, ref[0], ref[1])
    if v.detail.startswith("SKIPPED"):
        pytest.skip(v.detail)
    _check(v)
