"""kangaroo_infer: lossless self-speculative decoding with double early exiting (Kangaroo)."""

from .adapter import AdapterConfig, KangarooAdapter, base_fingerprint
from .base import SMOLLM2_ALIAS, load_base, load_tokenizer, materialize_smollm2
from .draft_export import export_draft
from .model import GenerateOutput, KangarooModel

__all__ = [
    "SMOLLM2_ALIAS",
    "AdapterConfig",
    "GenerateOutput",
    "KangarooAdapter",
    "KangarooModel",
    "base_fingerprint",
    "export_draft",
    "load_base",
    "load_tokenizer",
    "materialize_smollm2",
]
