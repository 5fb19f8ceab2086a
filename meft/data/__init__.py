"""Training and evaluation data: record formats (`formats`: Alpaca, ShareGPT, OpenAI messages,
prompt/completion, text), record files with file:line errors (`files`: .jsonl, .json, .parquet),
tokenization and batching (`records`), the built-in datasets (`builtin`), turning `--data` /
`--eval-data` into batches and evaluation splits (`sources`), and the facts the default model already
knows plus free prompts that `meft train` probes before and after training (`retention`), the questions
whose base-model answers `--replay` mixes into training (`replay`), answer scoring (`answers`), the general
prompts whose continuations a fine-tune should leave alone (`general_prompts`), and padding-free packed
micro-batches (`packed`).
"""

from meft._faces import lazy_face

_WHERE = {
    "build_examples": "meft.data.records",
    "collate": "meft.data.records",
    "BatchIterator": "meft.data.records",
    "IGNORE_INDEX": "meft.data.records",
    "fictional_facts": "meft.data.builtin",
    "world_facts": "meft.data.builtin",
    "load_run_data": "meft.data.sources",
    "load_records": "meft.data.files",
    "DataError": "meft.data.formats",
    "detect_format": "meft.data.formats",
    "to_canonical": "meft.data.formats",
    "retention_records": "meft.data.retention",
    "with_system_prompt": "meft.data.records",
    "prompt_ids": "meft.data.records",
    "RETENTION_MAX_NEW_TOKENS": "meft.data.retention",
    "GENERAL_PROMPTS": "meft.data.general_prompts",
    "replay_prompts": "meft.data.replay",
    "resolve_packing": "meft.data.packed",
}
__all__ = list(_WHERE)

__getattr__, __dir__ = lazy_face(__name__, _WHERE, __all__)
