"""Data: tokenizers, chat messages, dataset builders, packing, collate and `ftcore data check`.

Builders are instantiated from config, e.g. `_component_: ftcore.data.chat_dataset`.
"""

from ftcore.data.collate import packed_collate, padded_collate, preference_collate
from ftcore.data.datasets import (
    TokenizedDataset,
    chat_dataset,
    instruct_dataset,
    preference_dataset,
    text_completion_dataset,
)
from ftcore.data.packing import PackedDataset
from ftcore.data.pipeline import IGNORE_INDEX

__all__ = [
    "IGNORE_INDEX",
    "PackedDataset",
    "TokenizedDataset",
    "chat_dataset",
    "instruct_dataset",
    "packed_collate",
    "padded_collate",
    "preference_collate",
    "preference_dataset",
    "text_completion_dataset",
]
