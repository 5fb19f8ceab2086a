"""Training and evaluation data: record formats with file:line errors, tokenization and batching
(`records`), the built-in datasets (`builtin`), and turning `--data` / `--eval-data` into batches and
evaluation splits (`sources`).
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
}
__all__ = list(_WHERE)

__getattr__, __dir__ = lazy_face(__name__, _WHERE, __all__)
