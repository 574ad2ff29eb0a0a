"""The checkpointers under the name docs/architecture.md gives them (`ftcore.models.checkpoint`)."""

from ftcore.models.checkpoint_gguf import GGUFCheckpointer
from ftcore.models.checkpoint_hf import HFCheckpointer
from ftcore.models.checkpoint_meta import MetaCheckpointer

__all__ = ["GGUFCheckpointer", "HFCheckpointer", "MetaCheckpointer"]
