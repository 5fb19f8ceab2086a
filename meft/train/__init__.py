"""The training loop `meft train` runs (`loop`), its options (`args`), the resumable checkpoint
(`checkpoint`), the run log (`run_log`), the loss (`loss`), the HF Trainer callback (`hf_callback`) and
atomic file writes (`atomic`).
"""
