"""The sections of the GPU validation kit, one module each; `experiments/gpu_check.py` runs them.

`common` (the seeded random Llama, batches, wrap, comparisons, giving memory back between runs),
`cuda_tests` (a), `twin` (b), `syncs` (c), `pinned` (d), `step_time` (e). Each section is
`sec_<name>(args, device, deadline) -> dict` with "passed" and a one-line "summary". The folder's
name keeps "gpu_check" in every file name: the syncs section leaves the kit's own frames out of the
call sites it reports by that name.
"""
