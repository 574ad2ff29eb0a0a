"""The optimizer step fused into the backward (config key `optimizer_in_backward`, torchtune's
`optimizer_in_bwd`): one optimizer per trainable parameter, stepped from that parameter's
post-accumulate-grad hook, after which its gradient is freed. The full set of gradients never exists
at once (Llama-3.2-3B full fine-tuning: ~6 GiB of bf16 gradients saved).

Per-parameter optimizers (AdamW, SGD, 8-bit AdamW) update each tensor from its own gradient and
state only, so stepping them one at a time gives the same weights as one step over all of them. What
needs every gradient at once cannot work: gradient accumulation (the step would come after the first
micro-batch) and clipping by the global norm. The global norm is still measured, from the hooks, for
the `grad_norm` metric.

`OptimizerInBackward` looks like one optimizer to the rest of the code: `param_groups` are the
per-parameter optimizers' own group dicts (so an LR scheduler's changes reach every one of them),
`state_dict` / `load_state_dict` hold all their states (exact resume), `step` / `zero_grad` do nothing
(the work was done in the backward).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import cast

import torch


def check_optimizer_in_backward(
    gradient_accumulation_steps: int, clip_grad_norm: float | None, sharded: bool
) -> None:
    """Refuse, before any heavy work, what needs all gradients at once or is not supported."""
    if gradient_accumulation_steps > 1:
        raise ValueError(
            f"optimizer_in_backward=true steps each parameter as soon as its gradient is ready, so it cannot "
            f"accumulate gradients (gradient_accumulation_steps={gradient_accumulation_steps}); set "
            "gradient_accumulation_steps=1 (raise batch_size instead) or optimizer_in_backward=false"
        )
    if clip_grad_norm is not None:
        raise ValueError(
            f"optimizer_in_backward=true cannot clip gradients (clip_grad_norm={clip_grad_norm}): the global "
            "norm is known only after the last parameter has stepped; set clip_grad_norm=null or "
            "optimizer_in_backward=false"
        )
    if sharded:
        raise ValueError(
            "optimizer_in_backward=true is not supported under torchrun (FSDP2) yet: its per-parameter "
            "optimizers have no sharded checkpoint format; set optimizer_in_backward=false, or train in one process"
        )


class GradNormTracker:
    """The global L2 norm of the gradients, measured by post-accumulate-grad hooks as they arrive.

    Registered before any hook that frees a gradient. A parameter's entry is overwritten each time its
    gradient grows (gradient accumulation), so the norm is that of the final gradients.
    """

    def __init__(self, params: Iterable[torch.Tensor]):
        self._norms: dict[int, torch.Tensor] = {}
        for param in params:
            param.register_post_accumulate_grad_hook(self._record)

    def _record(self, param: torch.Tensor) -> None:
        # Kept on the device, a 0-d tensor per parameter: no host sync inside the backward.
        grad = cast(torch.Tensor, param.grad)  # set: the hook runs after accumulating into it
        self._norms[id(param)] = torch.linalg.vector_norm(grad.detach(), dtype=torch.float32)

    def take(self) -> float:
        """The norm of the gradients seen since the last call (0.0 for none), as clip_grad_norm_ computes
        it: the norm of the per-tensor norms."""
        if not self._norms:
            return 0.0
        norm = torch.linalg.vector_norm(torch.stack(list(self._norms.values())))  # one host sync, below
        self._norms.clear()
        return float(norm)


class OptimizerInBackward(torch.optim.Optimizer):
    """One optimizer per parameter, stepped in the backward; see the module docstring.

    `make_optimizer([param])` builds one parameter's optimizer (e.g. the config's optimizer component).
    Torch's Optimizer.__init__ is not called: this object holds no parameters of its own, only the
    per-parameter optimizers (an LR scheduler needs an Optimizer instance, as torchao's
    CPUOffloadOptimizer does the same).
    """

    def __init__(
        self, params: list[torch.nn.Parameter], make_optimizer: Callable[[list], torch.optim.Optimizer]
    ):
        self._params = list(params)
        self.optimizers = [make_optimizer([param]) for param in self._params]
        if any(hasattr(optimizer, "take_grad_norm") for optimizer in self.optimizers):
            raise ValueError(
                "optimizer_in_backward=true with an optimizer that already works inside the backward "
                "(e.g. ftcore.training.cpu_offload_adamw): pick one; set optimizer_in_backward=false"
            )
        self._norm = GradNormTracker(self._params)  # first: it reads each gradient before the step frees it
        for param, optimizer in zip(self._params, self.optimizers):
            param.register_post_accumulate_grad_hook(self._stepper(optimizer))

    @staticmethod
    def _stepper(optimizer: torch.optim.Optimizer) -> Callable[[torch.Tensor], None]:
        def step_and_free(param: torch.Tensor) -> None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return step_and_free

    @property  # a read-only view; torch declares a plain attribute, which a property cannot override
    def param_groups(self) -> list[dict]:  # type: ignore[override]
        # Looked up afresh each time: load_state_dict replaces each optimizer's group dicts.
        return [group for optimizer in self.optimizers for group in optimizer.param_groups]

    @property  # a read-only view, as param_groups (a dict, not torch's defaultdict)
    def state(self) -> dict:  # type: ignore[override]
        return {param: optimizer.state[param] for param, optimizer in zip(self._params, self.optimizers)}

    def take_grad_norm(self) -> float:
        """The global gradient norm of the last backward (what the loop logs as `grad_norm`)."""
        return self._norm.take()

    def step(self, closure=None):
        """Nothing to do: each parameter was stepped in the backward. (Called by the loop, which lets an
        LR scheduler see that the optimizer stepped before it.)"""
        return closure() if closure is not None else None

    def zero_grad(self, set_to_none: bool = True) -> None:
        for param in self._params:  # already None after the backward; kept for callers outside the loop
            param.grad = None

    def state_dict(self) -> dict:
        return {"per_parameter": [optimizer.state_dict() for optimizer in self.optimizers]}

    def load_state_dict(self, state_dict: dict) -> None:
        saved = state_dict.get("per_parameter")
        if saved is None or len(saved) != len(self.optimizers):
            found = "an ordinary optimizer state" if saved is None else f"{len(saved)} parameters"
            raise ValueError(
                f"the checkpoint's optimizer state holds {found}, this run has {len(self.optimizers)} "
                "per-parameter optimizers: resume with the optimizer_in_backward setting it was saved with"
            )
        for optimizer, state in zip(self.optimizers, saved):
            optimizer.load_state_dict(state)
