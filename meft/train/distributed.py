"""`meft train` under torchrun: the process group, each rank's shard of a batch, who writes outputs, and what
happens when a rank dies.

Owns `Ranks`: opened from the environment torchrun sets (`WORLD_SIZE`, `RANK`, `LOCAL_RANK`); one process
without it. With several ranks it initialises torch.distributed (gloo for CPU tensors, NCCL for CUDA ones),
pins each rank to its GPU, splits every global batch (`--batch-size` examples) into one contiguous shard
per rank, and reduces the numbers the loop logs (loss, tokens, a stop request) across ranks each step so
every rank takes the same decisions. Only rank 0 writes the run folder (metrics, checkpoints, adapter,
summary) and evaluates; `meft.wrap` and the scheduler do the data-parallel training itself
(`meft.adapter.distributed`, `offload.collective`).

Failure is loud and bounded (`RankWatchdog`, `RankFailedError`): every rank runs a watchdog thread that
bumps a heartbeat counter in the process group's store (torchrun's agent store, or rank 0's TCPStore)
every second and watches the other ranks' counters. A rank whose heartbeat has not moved for
`MEFT_RANK_TIMEOUT_S` seconds (default 60) that did not say it finished, a rank that recorded an error,
or a store that stops answering, makes every other rank print one message naming the failed rank and
what to do (the latest complete checkpoint, `--resume`) and exit with status 1 -- whatever the main
thread is blocked in (an NCCL or gloo collective would otherwise wait for the process-group timeout,
30 minutes). Under torchrun on one node the agent notices a dead worker first (within its 0.1 s monitor
interval) and SIGTERMs the others; their SIGTERM handler prints the same message, naming the dead rank
(a rank on this node whose process is gone) before exiting. A SIGTERM during the step loop with no failed
rank (a scheduler or `kill` stopping the job; torchrun passes its own SIGTERM on to every worker) is a stop
request instead: the loop's handler sets it, the ranks agree on it in the step's reduction, every rank
stops after the same step and rank 0 saves a checkpoint (`Ranks.exit_if_peer_failed`). An exception in a
rank (a user error, a collective that failed because its peer closed the connection) is recorded in the
store for the others' watchdogs, and re-raised as `RankFailedError` naming the dead peer when one is known
(after a failed collective, once the peer's heartbeat has gone stale: at most the timeout). Nodes are told
apart by `offload.node.node_key` (hostname, or MEFT_NODE_ID: emulated nodes on one machine are other hosts
here).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from meft.train.checkpoint import latest_checkpoint
from offload.node import node_key

__all__ = ["Ranks", "RankWatchdog", "RankFailedError", "rank_timeout_s", "TIMEOUT_ENV", "PEER_FAILED_EXIT"]

TIMEOUT = timedelta(minutes=30)  # longest a rank waits in a collective (rank 0 evaluates while others wait)
TIMEOUT_ENV = "MEFT_RANK_TIMEOUT_S"  # seconds without a heartbeat before a rank counts as dead
DEFAULT_RANK_TIMEOUT_S = 60.0
PEER_FAILED_EXIT = 1  # exit status of a rank that stops because another rank failed


class RankFailedError(RuntimeError):
    """Another rank of the run died, hung or failed; the message names it and says what to do."""


def rank_timeout_s() -> float:
    """Seconds without a heartbeat after which a rank counts as dead (`MEFT_RANK_TIMEOUT_S`, default 60)."""
    raw = os.environ.get(TIMEOUT_ENV, str(DEFAULT_RANK_TIMEOUT_S))
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ValueError(f"{TIMEOUT_ENV}={raw!r}: expected a number of seconds > 0, e.g. 60")
    return value


def _process_gone(pid: int) -> bool:
    """This host's process `pid` has exited (missing, or a zombie its launcher has not reaped yet)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return True
    except OSError:
        return False


class RankWatchdog:
    """Heartbeats of every rank in the process group's store; stops this process when another rank fails.

    Keys (under the prefix "meft/ranks/"): `hb/R` (a counter rank R bumps every `interval_s`), `done/R`
    (rank R finished normally: its silence is expected), `failed/R` (the error rank R raised), `pid/R`
    ("host pid", to tell a dead local process from a slow one).
    """

    def __init__(self, store, rank: int, world: int, timeout_s: float, *, checkpoint_hint=None):
        self.store = dist.PrefixStore("meft/ranks/", store)
        self.rank, self.world, self.timeout_s = rank, world, timeout_s
        self.interval_s = min(1.0, timeout_s / 10)
        self.checkpoint_hint = checkpoint_hint or (lambda: "")  # () -> sentence about the latest checkpoint
        self.host, self.pid = node_key(), os.getpid()  # emulated nodes (MEFT_NODE_ID) count as other hosts
        self._stop = threading.Event()
        self._failed = False  # this rank recorded an error: never mark it done
        self._last = {r: (0, time.monotonic()) for r in range(world) if r != rank}  # r -> (counter, seen at)
        self.store.set(f"pid/{rank}", f"{self.host} {self.pid}")
        self.store.add(f"hb/{rank}", 1)
        self._thread = threading.Thread(target=self._run, name=f"meft-rank-watchdog-{rank}", daemon=True)
        self._thread.start()

    # ---- what the other ranks are doing ------------------------------------------------------------
    def _peer_pid(self, r: int) -> tuple[str, int] | None:
        try:
            if not self.store.check([f"pid/{r}"]):
                return None
            host, pid = self.store.get(f"pid/{r}").decode().split()
            return host, int(pid)
        except Exception:  # noqa: BLE001 -- a diagnosis must not raise
            return None

    def failed_peers(self) -> dict[int, str]:
        """{rank: why} for the ranks known to have failed now: an error they recorded, a local process that
        is gone, or a heartbeat silent for longer than the timeout (ranks that finished are skipped)."""
        out = {}
        now = time.monotonic()
        for r, (_, seen) in self._last.items():
            try:
                if self.store.add(f"done/{r}", 0):
                    continue
                if self.store.check([f"failed/{r}"]):
                    out[r] = "failed with " + self.store.get(f"failed/{r}").decode()
                    continue
            except Exception:  # noqa: BLE001
                pass
            where = self._peer_pid(r)
            if where is not None and where[0] == self.host and _process_gone(where[1]):
                out[r] = f"died (its process, pid {where[1]} on {where[0].split(':', 1)[-1]}, is gone)"
            elif now - seen > self.timeout_s:
                out[r] = (f"stopped responding: no heartbeat for {now - seen:.0f} s ({TIMEOUT_ENV}="
                          f"{self.timeout_s:g}); its process died, hangs, or its host is unreachable")
        return out

    def message(self, failed: dict[int, str], how: str) -> str:
        """The one message a surviving rank prints: who failed, and what to do."""
        who = "; ".join(f"rank {r} {why}" for r, why in sorted(failed.items())) or (
            "another rank failed or the launcher stopped the run (torchrun's 'Root Cause' report names the rank)")
        hint = self.checkpoint_hint()
        return (f"rank {self.rank} of {self.world} {how}: {who}. Fix: look at the failed rank's own "
                f"error above (out of memory, a killed process, a lost node), then rerun the same torchrun "
                f"command with --resume{hint}")

    # ---- the thread ----------------------------------------------------------------------------------
    def _run(self) -> None:
        store_errors_since = None
        while not self._stop.wait(self.interval_s):
            try:
                self.store.add(f"hb/{self.rank}", 1)
                now = time.monotonic()
                for r, (count, _seen) in list(self._last.items()):
                    c = self.store.add(f"hb/{r}", 0)
                    if c != count:
                        self._last[r] = (c, now)
                store_errors_since = None
            except Exception as exc:  # noqa: BLE001 -- the store's host is gone (or the run is closing)
                if self._stop.is_set():
                    return
                store_errors_since = store_errors_since or time.monotonic()
                if time.monotonic() - store_errors_since > min(self.timeout_s, 3 * self.interval_s + 2):
                    where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
                    self._abort({0: f"(or the torchrun agent) hosting the rendezvous store at {where} is "
                                    f"unreachable ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"})
                continue
            failed = self.failed_peers()
            if failed and not self._stop.is_set():
                self._abort(failed)

    def _abort(self, failed: dict[int, str]) -> None:
        _exit_loudly(self.message(failed, "stops because"))

    def finish(self) -> None:
        """This rank ended normally: say so (its silence is no failure) and stop the thread."""
        self._stop.set()
        if not self._failed:
            try:
                self.store.add(f"done/{self.rank}", 1)
            except Exception:  # noqa: BLE001
                pass
        self._thread.join(timeout=5)

    def record_failure(self, exc: BaseException) -> None:
        """Tell the other ranks' watchdogs why this rank is about to exit."""
        self._stop.set()
        self._failed = True
        first = str(exc).splitlines()[0][:300] if str(exc) else ""
        try:
            self.store.set(f"failed/{self.rank}", f"{type(exc).__name__}: {first}")
        except Exception:  # noqa: BLE001
            pass


def _from_a_collective(exc: BaseException) -> bool:
    """`exc` looks like a collective that failed because a peer went away (gloo / NCCL / the store)."""
    if isinstance(exc, dist.DistError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(w in text for w in (
        "connection closed", "connection reset", "broken pipe", "gloo", "nccl", "timed out", "socket"))


def _exit_loudly(message: str, status: int = PEER_FAILED_EXIT) -> None:
    """Print `message` on stderr and end the process now (the main thread may be blocked in a collective)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001
            pass
    os.write(2, ("\nmeft train: error: " + message + "\n").encode())
    os._exit(status)


class Ranks:
    """The ranks of this run (see module docstring). `world == 1`: a plain single process."""

    def __init__(self, batch_size: int, device: str, output_dir: str | Path | None = None):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.owned = False  # this object initialised the process group (and destroys it)
        self.watchdog: RankWatchdog | None = None
        self._old_sigterm = None
        if self.world == 1:
            return
        if batch_size % self.world:
            raise ValueError(f"--batch-size {batch_size} under torchrun with {self.world} ranks: the global batch "
                             f"is split into one shard per rank; fix: a multiple of {self.world}")
        timeout_s = rank_timeout_s()
        cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        if not dist.is_initialized():
            dist.init_process_group(backend="cpu:gloo,cuda:nccl" if cuda else "gloo", timeout=TIMEOUT)
            self.owned = True
        store = dist.distributed_c10d._get_default_store()  # the rendezvous store every rank already reaches
        self.watchdog = RankWatchdog(store, self.rank, self.world, timeout_s, checkpoint_hint=self._checkpoint_hint)
        if threading.current_thread() is threading.main_thread():
            self._old_sigterm = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _checkpoint_hint(self) -> str:
        if self.output_dir is None:
            return ""
        try:
            ckpt = latest_checkpoint(self.output_dir)
        except Exception:  # noqa: BLE001
            ckpt = None
        if ckpt is None:
            return f" (no complete checkpoint under {self.output_dir} yet: that restarts the run from step 0)"
        return f" to continue from {ckpt} (the latest complete checkpoint)"

    def _sigterm_failed_peers(self) -> dict[int, str]:
        failed = self.watchdog.failed_peers() if self.watchdog is not None else {}
        if not failed and self.watchdog is not None:
            time.sleep(0.5)  # the dead rank's launcher may not have seen it yet; the /proc check is instant
            failed = self.watchdog.failed_peers()
        return failed

    def _on_sigterm(self, signum, frame) -> None:
        """torchrun ends the other workers with SIGTERM when one fails: say which one and what to do."""
        failed = self._sigterm_failed_peers()
        _exit_loudly(self.watchdog.message(failed, "was stopped (SIGTERM from the launcher) because"), 128 + signum)

    def exit_if_peer_failed(self, signum: int) -> None:
        """In the step loop a SIGTERM is a request to save and stop (a scheduler, `kill`, torchrun passing on its
        own SIGTERM), unless it is torchrun ending the survivors of a failed rank: then no collective can
        complete, and this rank exits at once with the message naming the failed rank."""
        if self.watchdog is None:
            return
        failed = self._sigterm_failed_peers()
        if failed:
            _exit_loudly(self.watchdog.message(failed, "was stopped (SIGTERM from the launcher) because"),
                         128 + signum)

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes the run folder, prints and evaluates."""
        return self.rank == 0

    def shard(self, batch: dict) -> dict:
        """This rank's contiguous slice of a global batch (every tensor along dim 0)."""
        if self.world == 1:
            return batch
        n = next(iter(batch.values())).shape[0] // self.world
        return {k: v[self.rank * n:(self.rank + 1) * n] for k, v in batch.items()}

    def reduce(self, loss: float, tokens: int, stop: bool) -> tuple[float, int, bool]:
        """(mean loss over ranks, total input tokens, any rank asked to stop): the same on every rank."""
        if self.world == 1:
            return loss, tokens, stop
        t = torch.tensor([loss, float(tokens), float(stop)], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return float(t[0]) / self.world, int(t[1]), bool(t[2] > 0)

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def failed(self, exc: BaseException) -> BaseException:
        """This rank is ending with `exc`: record it for the other ranks and return the exception to raise --
        a `RankFailedError` naming the culprit when `exc` came from a collective whose peer is known dead."""
        if self.watchdog is None or isinstance(exc, (KeyboardInterrupt, SystemExit)):
            return exc
        peers = self.watchdog.failed_peers()
        user_error = isinstance(exc, (ValueError, FileNotFoundError, NotADirectoryError, MemoryError, KeyError))
        # not a user error: a peer on this node may still be exiting (its sockets close before its process is
        # gone), a peer on another node goes silent within the timeout; wait for the diagnosis that long
        wait_s = 0.0 if user_error else (self.watchdog.timeout_s if _from_a_collective(exc) else 3.0)
        if not peers and wait_s:
            deadline = time.monotonic() + wait_s + 2 * self.watchdog.interval_s
            while not peers and time.monotonic() < deadline:
                time.sleep(self.watchdog.interval_s)
                peers = self.watchdog.failed_peers()
        self.watchdog.record_failure(exc)
        if not peers:
            return exc
        err = RankFailedError(self.watchdog.message(peers, "stops because"))
        err.__cause__ = exc
        return err

    def close(self) -> None:
        failing = self.watchdog is not None and self.watchdog._failed
        if self.watchdog is not None:
            self.watchdog.finish()
            # failing: the SIGTERM handler, kept below, still reads it (the launcher's SIGTERM can land while
            # main() reports the failure; seen in CI)
            if not failing:
                self.watchdog = None
        if self._old_sigterm is not None and not failing:  # failing: a racing SIGTERM still explains itself
            signal.signal(signal.SIGTERM, self._old_sigterm)
            self._old_sigterm = None
        if self.owned and dist.is_initialized():
            dist.destroy_process_group()
            self.owned = False
