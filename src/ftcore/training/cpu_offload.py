"""torchao's CPU-offload optimizer, fitted to ftcore's loop (built by `ftcore.training.cpu_offload_adamw`).

torchao keeps a pinned CPU copy of each large parameter with its AdamW moments; each gradient is
copied to the CPU by a post-accumulate-grad hook during the backward, `step()` runs AdamW on the CPU
and copies the new weights back. GPU memory saved: the optimizer state (8 bytes per fp32-moment
parameter), and the gradients too with `offload_gradients=True`. Its own file: importing torchao is
slow, and only runs that ask for it pay.

What that design rules out, refused by `check_loop_settings` with the key to change: clipping (the
CPU copy of a gradient is taken before a clip could scale it), gradient accumulation with
`offload_gradients` (each micro-batch's gradient replaces the last), and several ranks (torchao's
optimizer is single-GPU).
"""

from __future__ import annotations

import torch
from torchao.optim import CPUOffloadOptimizer

from ftcore.training.optim import _all_tensors
from ftcore.training.optim_in_backward import GradNormTracker


class CPUOffloadAdamW(CPUOffloadOptimizer):
    def __init__(self, params: list, *, offload_gradients: bool, minimal_size: int, **adamw_kwargs):
        tensors = [t for t in _all_tensors(params) if t.requires_grad]
        if not torch.cuda.is_available() or any(t.device.type != "cuda" for t in tensors):
            raise ValueError(
                "optimizer ftcore.training.cpu_offload_adamw needs the model on a CUDA GPU (it moves the "
                "optimizer from the GPU to the CPU); on the CPU use ftcore.training.adamw (set device=cuda "
                "or pick another optimizer._component_)"
            )
        self.offload_gradients = offload_gradients
        # Registered before torchao's hooks, so it reads each gradient before offload_gradients frees it.
        self._norm = GradNormTracker(tensors)
        super().__init__(
            params,
            torch.optim.AdamW,
            offload_gradients=offload_gradients,
            minimal_size=minimal_size,
            **adamw_kwargs,
        )

    def take_grad_norm(self) -> float:
        """The global norm of the gradients of the last backward (the loop's `grad_norm`)."""
        return self._norm.take()

    def check_loop_settings(
        self, gradient_accumulation_steps: int, clip_grad_norm: float | None, sharded: bool
    ) -> None:
        if clip_grad_norm is not None:
            raise ValueError(
                f"optimizer ftcore.training.cpu_offload_adamw cannot clip gradients (clip_grad_norm="
                f"{clip_grad_norm}): each gradient is copied to the CPU during the backward, before a clip; "
                "set clip_grad_norm=null or use another optimizer"
            )
        if self.offload_gradients and gradient_accumulation_steps > 1:
            raise ValueError(
                "optimizer.offload_gradients=true frees each GPU gradient during the backward, so it cannot "
                f"accumulate gradients (gradient_accumulation_steps={gradient_accumulation_steps}); set "
                "optimizer.offload_gradients=false or gradient_accumulation_steps=1"
            )
        if sharded:
            raise ValueError(
                "optimizer ftcore.training.cpu_offload_adamw is single-GPU (torchao's CPUOffloadOptimizer); "
                "under torchrun use FSDP's own offload (fsdp.cpu_offload=true) with ftcore.training.adamw"
            )

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        # Loading gives the GPU optimizer new group dicts; torchao's `param_groups` (what an LR scheduler
        # changes) would still list the old ones, and the small tensors' lr would stop following it.
        if self.d_opt is not None:
            self.d_param_groups = self.d_opt.param_groups
        # The CPU copies were taken when this optimizer was built; resume loads the weights after that,
        # so take them again, or the next step would start from the weights before the resume.
        with torch.no_grad():
            for param, host in self.param_d2h_map.items():
                host.copy_(param.detach())
