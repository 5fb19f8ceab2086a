"""The rank watchdog's diagnosis on a real in-memory c10d store (the multi-process behaviour -- a SIGKILLed rank
under torchrun, on one node and on an emulated second node -- is tested in tests/meft/cli/test_train.py)."""

import time

import pytest
import torch.distributed as dist

from meft.train.distributed import TIMEOUT_ENV, RankWatchdog, rank_timeout_s


def test_a_silent_failed_or_finished_peer_is_told_apart():
    store = dist.HashStore()
    w = RankWatchdog(store, 0, 3, 0.3, checkpoint_hint=lambda: " to continue from ckpt/step-000004")
    w.finish()  # stop the thread (it would end this process on a failure); the diagnosis still works
    peers = dist.PrefixStore("meft/ranks/", store)
    peers.add("done/2", 1)  # rank 2 finished normally: its silence is no failure
    assert w.failed_peers() == {}
    time.sleep(0.4)
    failed = w.failed_peers()
    assert list(failed) == [1] and "no heartbeat" in failed[1]
    peers.set("failed/1", "ValueError: bad data line 3")
    assert w.failed_peers() == {1: "failed with ValueError: bad data line 3"}
    msg = w.message(w.failed_peers(), "stops because")
    assert msg.startswith("rank 0 of 3 stops because: rank 1 failed with ValueError") and "--resume" in msg
    assert "ckpt/step-000004" in msg


def test_rank_timeout_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv(TIMEOUT_ENV, "7.5")
    assert rank_timeout_s() == 7.5
    monkeypatch.setenv(TIMEOUT_ENV, "0")
    with pytest.raises(ValueError, match=TIMEOUT_ENV):
        rank_timeout_s()
