"""The training loop `meft train` runs (`loop`), its options (`args`), the resumable checkpoint
(`checkpoint`), the run log (`run_log`), the loss (`loss`), the HF Trainer callback (`hf_callback`),
experiment tracking for --report-to (`tracking`) and the ranks of a torchrun
run with their failure handling (`distributed`), and the base model's answers that --replay trains on
(`replay`).
"""

from meft._faces import lazy_face

_WHERE = {
    "train": "meft.train.loop",
    "train_step": "meft.train.loop",
    "setup_run": "meft.train.loop",
    "lay_out": "meft.train.loop",
    "save_training_state": "meft.train.checkpoint",
    "load_training_state": "meft.train.checkpoint",
    "latest_checkpoint": "meft.train.checkpoint",
    "TrainArgs": "meft.train.args",
    "self_replay_records": "meft.train.replay",
    "causal_lm_loss": "meft.train.loss",
    "step_loss": "meft.train.loss",
    "MeftCallback": "meft.train.hf_callback",
    "open_tracker": "meft.train.tracking",
    "parse_report_to": "meft.train.tracking",
    "Ranks": "meft.train.distributed",
    "RankFailedError": "meft.train.distributed",
}
__all__ = list(_WHERE)

__getattr__, __dir__ = lazy_face(__name__, _WHERE, __all__)
