"""meft: sparse FFN adapters far larger than the GPU, held in CPU memory, for HF causal LMs.

Public names are resolved lazily (PEP 562) so `import meft` stays cheap and never initializes CUDA.
Subpackages by role (each with its own public face): `adapter`, `lomo`, `data`, `train`, `plan`,
`profile`, `cli`; modules `config`, `pretrained`, `evaluate`, `agreement` (general-prompt agreement with the
base model) and `trade_off` (what a fine-tune kept and lost).
"""

from meft._faces import lazy_face

_WHERE = {
    "wrap": "meft.adapter.wrap",
    "unwrap": "meft.adapter.wrap",
    "MeftConfig": "meft.config",
    "MeftRuntime": "meft.adapter.runtime",
    "Lomo": "meft.lomo.optimizers",
    "AdaLomo": "meft.lomo.optimizers",
    "save_adapter": "meft.adapter.saving",
    "load_adapter": "meft.adapter.saving",
    "load_model": "meft.pretrained",
    "MeftCallback": "meft.train.hf_callback",
    "general_reference": "meft.agreement",
    "general_agreement": "meft.agreement",
}
__all__ = list(_WHERE)

__getattr__, __dir__ = lazy_face(__name__, _WHERE, __all__)
