"""In-process checks of what keeps a run safe before anything loads: the run folder's ownership (lock,
refusal, --overwrite), checkpoint manifests, the options a resume compares, option ranges, the layer
choice, a run's own config.json as --config, unreadable data files, and an adapter's base identity."""

import json
import subprocess
import sys

import pytest
import torch

from meft.train.args import TrainArgs
from meft.train.manifest import verify_manifest, write_manifest
from meft.train.resume import ResumeError, check_options, defining_options, plan_resume
from meft.train.run_args import check_train_args
from meft.train.run_folder import RunFolderError, claim_run_folder


def test_an_occupied_folder_is_refused_and_overwrite_removes_only_the_run(tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints" / ".step-000003.x.tmp").mkdir(parents=True)
    (out / "metrics.jsonl").write_text("{}\n")
    (out / "notes.txt").write_text("mine")
    with pytest.raises(RunFolderError, match="already holds a run.*--resume.*--output-dir.*--overwrite"):
        claim_run_folder(out, resume=False, overwrite=False)
    assert (out / "metrics.jsonl").exists()
    lock = claim_run_folder(out, resume=False, overwrite=True)
    assert not (out / "metrics.jsonl").exists() and not (out / "checkpoints").exists()
    assert (out / "notes.txt").read_text() == "mine"
    lock.release()


def test_the_lock_refuses_a_second_live_process_and_dies_with_it(tmp_path):
    out = tmp_path / "run"
    lock = claim_run_folder(out, resume=False, overwrite=False)
    code = ("import sys; from meft.train.run_folder import claim_run_folder\n"
            f"claim_run_folder({str(out)!r}, resume=True, overwrite=False)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "in use by another live meft train" in p.stderr
    lock.release()
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]


def test_orphans_of_a_killed_save_are_removed_and_nothing_else(tmp_path):
    """A kill inside an atomic write leaves `.<name>.*.tmp` files or folders (the checkpoint folder, the `latest`
    pointer, the adapter, config/summary); the next start removes them and leaves the run's files alone."""
    from meft.train.run_folder import remove_orphans

    ck = tmp_path / "checkpoints"
    (ck / ".step-000004.abc.tmp").mkdir(parents=True)
    (ck / "step-000002").mkdir()
    (ck / ".latest.x1y2.tmp").write_text("step-000004\n")
    (ck / "latest").write_text("step-000002\n")
    (tmp_path / ".adapter.q.tmp").mkdir()
    (tmp_path / ".config.json.z.tmp").write_text("{")
    (tmp_path / "summary.json.tmp").write_text("{")
    (tmp_path / "notes.tmp").write_text("the user's")
    removed = {p.name for p in remove_orphans(tmp_path)}
    assert removed == {".step-000004.abc.tmp", ".latest.x1y2.tmp", ".adapter.q.tmp", ".config.json.z.tmp",
                       "summary.json.tmp"}
    assert sorted(p.name for p in ck.iterdir()) == ["latest", "step-000002"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints", "notes.tmp"]


def test_output_dir_that_is_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(RunFolderError, match="is a file"):
        claim_run_folder(f, resume=False, overwrite=False)


def test_manifest_finds_truncation_and_damage(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"x" * 100)
    assert "no manifest" in verify_manifest(tmp_path)
    write_manifest(tmp_path)
    assert verify_manifest(tmp_path) is None
    (tmp_path / "a.bin").write_bytes(b"x" * 50)
    assert "50 bytes" in verify_manifest(tmp_path)
    (tmp_path / "a.bin").write_bytes(b"y" * 100)
    assert "checksum" in verify_manifest(tmp_path)


def test_resume_refuses_another_defining_option(tmp_path):
    from meft.config import MeftConfig

    saved = defining_options(TrainArgs(), MeftConfig())
    check_options(saved, defining_options(TrainArgs(steps=99, save_every=5, report_to="tensorboard"), MeftConfig()),
                  tmp_path)
    with pytest.raises(ResumeError, match=r"--adapter-lr: the run has 0.03, this command 0.1"):
        check_options(saved, defining_options(TrainArgs(), MeftConfig(adapter_lr=0.1)), tmp_path)
    with pytest.raises(ResumeError, match="--batch-size"):
        check_options(saved, defining_options(TrainArgs(batch_size=8), MeftConfig()), tmp_path)


def test_resume_of_a_completed_run_without_checkpoints_says_so(tmp_path):
    (tmp_path / "summary.json").write_text(json.dumps({"steps": 8, "interrupted": False}))
    with pytest.raises(ResumeError, match="completed .* nothing to resume.*adapter.*--save-every"):
        plan_resume(tmp_path, {})


@pytest.mark.parametrize("field,value,match", [("steps", -5, "--steps -5"), ("epochs", 0, "--epochs 0"),
                                               ("batch_size", 0, "--batch-size 0")])
def test_out_of_range_options(field, value, match):
    with pytest.raises(ValueError, match=match):
        check_train_args(TrainArgs(**{field: value}))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda():
    with pytest.raises(ValueError, match="--device 'cuda'.*fix: --device cpu"):
        check_train_args(TrainArgs(device="cuda"))


def test_layers_stride_larger_than_the_model():
    from meft.adapter.targets import check_layer_choice
    from tests.meft.data.test_records import tiny_model

    model = tiny_model(300)
    n = model.config.num_hidden_layers
    with pytest.raises(ValueError, match=rf"layers = 999: .*fix: a stride in 1..{n - 1}"):
        check_layer_choice(999, model)
    with pytest.raises(ValueError, match="index 999 is out of range"):
        check_layer_choice([0, 999], model)
    check_layer_choice(1, model)


def test_a_run_config_json_is_read_as_its_options(tmp_path):
    from meft.cli.options import read_config_file

    path = tmp_path / "config.json"
    path.write_text(json.dumps({"train": {"steps": 7, "resume": True}, "meft": {"adapter_rows": 512},
                                "world_size": 1}))
    assert read_config_file(path) == {"steps": 7, "adapter_rows": 512}


def test_unreadable_data_files_name_file_and_line(tmp_path):
    from meft.data.files import load_records
    from meft.data.formats import DataError

    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"prompt": "q", "completion": "a"}\n{"prompt": "\xff", "completion": "a"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: not UTF-8"):
        load_records(bad)
    with pytest.raises(DataError, match="is a folder"):
        load_records(tmp_path)


def test_adapter_refuses_another_base_unless_forced(tmp_path):
    import meft
    from meft.adapter.saving import load_adapter, save_adapter
    from meft.config import MeftConfig
    from tests.meft.data.test_records import tiny_model

    cfg = MeftConfig(adapter_rows=64, expert_size=16, max_active_rows=32)
    model = tiny_model(300, seed=0)
    meft.wrap(model, cfg)
    save_adapter(model, str(tmp_path / "ad"), verbose=False)
    model.meft.close()
    other = tiny_model(300, seed=1)  # same shape, other weights
    with pytest.raises(ValueError, match="another base model.*weights.*force=True"):
        load_adapter(other, str(tmp_path / "ad"), verbose=False)
    load_adapter(other, str(tmp_path / "ad"), verbose=False, force=True).meft.close()
    (tmp_path / "ad" / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="adapter_config.json: not valid JSON"):
        load_adapter(tiny_model(300), str(tmp_path / "ad"), verbose=False)
