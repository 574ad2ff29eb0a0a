"""A selective-checkpoint mode pair in the older torch order, for testing ftcore's policy under it.

torch 2.11 (the GPU machine's) calls the policy BEFORE each op, consults it AGAIN in the recompute to
decide cached-or-run, and stores kept outputs as key -> [entry]; torch 2.13 (CPU) calls it once, after
the op, and stores key -> {index: entry}. This pair follows the older order, with torch's own version
wrappers, so the CPU tests can run the policy both ways. Built from that description, not copied."""

from __future__ import annotations

from collections import defaultdict

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map
from torch.utils.checkpoint import (
    SAC_IGNORED_OPS,
    CheckpointPolicy,
    SelectiveCheckpointContext,
    _VersionWrapper,
)

KEEP = (CheckpointPolicy.MUST_SAVE, CheckpointPolicy.PREFER_SAVE)


def _detached(value):
    return value.detach() if isinstance(value, torch.Tensor) else value


class _Caching(TorchDispatchMode):
    def __init__(self, policy_fn, storage):
        super().__init__()
        self.policy_fn, self.storage = policy_fn, storage

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in SAC_IGNORED_OPS:
            return func(*args, **kwargs)
        policy = self.policy_fn(SelectiveCheckpointContext(is_recompute=False), func, *args, **kwargs)
        out = func(*args, **kwargs)
        if policy in KEEP:
            self.storage[func].append(tree_map(lambda x: _VersionWrapper(_detached(x)), out))
        return out


class _Cached(TorchDispatchMode):
    def __init__(self, policy_fn, storage, allow_mutation):
        super().__init__()
        self.policy_fn, self.storage, self.allow_mutation = policy_fn, storage, allow_mutation

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in SAC_IGNORED_OPS:
            return func(*args, **kwargs)
        policy = self.policy_fn(SelectiveCheckpointContext(is_recompute=True), func, *args, **kwargs)
        if policy in KEEP:
            return tree_map(lambda x: x.get_val(self.allow_mutation), self.storage[func].pop(0))
        return func(*args, **kwargs)


def create_contexts_before_op(policy_fn, allow_cache_entry_mutation=False):
    """Drop-in for torch.utils.checkpoint.create_selective_checkpoint_contexts, older order."""
    storage: dict = defaultdict(list)
    return _Caching(policy_fn, storage), _Cached(policy_fn, storage, allow_cache_entry_mutation)
