"""Training and evaluation data: record formats with file:line errors, tokenization and batching
(`records`), the built-in datasets (`builtin`), and turning `--data` / `--eval-data` into batches and
evaluation splits (`sources`).
"""
