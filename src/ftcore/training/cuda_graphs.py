"""`cuda_graphs`: each micro-batch's forward and backward replayed from a CUDA graph.

In eager PyTorch, Python launches every kernel. A Llama block's forward, recompute and backward are
hundreds of launches, and for 8B LoRA and QLoRA the host takes longer to issue a step than the GPU
takes to run it (docs/performance.md, "Where the time goes"). A CUDA graph records the launches once;
then one call replays them all. What replay needs, and how this module provides it:

- Static addresses. Each batch is copied into the tensors the graph was captured with. There is one
  graph per batch signature (keys, shapes, dtypes), up to `max_graphs`. Beyond that, new shapes run
  eagerly, so pad or pack batches to a fixed length to stay inside the graphs.
- Warm-up before capture. The first `warmup_calls` micro-batches of a signature run eagerly on a side
  stream, as PyTorch's CUDA-graph notes ask. That also compiles the Triton kernels first.
- Gradients. The first capture is of a step's first micro-batch (every `.grad` None; until one comes,
  after the warm-ups, micro-batches run eagerly): its backward
  allocates each gradient in the graph's pool when it reaches it, as an eager backward does, so a full
  fine-tune's gradients do not all sit beside the forward's activations. Those tensors are then the
  static gradients: set as `.grad` after each replay of that graph, and added into (in place) by the
  graphs of later micro-batches and of other shapes, which get them back, zeroed, after a
  `zero_grad(set_to_none=True)`. So the training loop needs no change, and gradient accumulation works.
- Random numbers (LoRA dropout). PyTorch's CUDA generator is graph-safe, so each replay draws fresh
  numbers.

`check_cuda_graphs` refuses what cannot be captured: a non-CUDA device; FSDP2 (collectives and hooks
run in every step); `compile` (use one or the other); activation offloading and `ac_offload_blocks` (host
copies and events in every step); and optimizers that step inside the backward.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import cast

import torch

from ftcore.training.accumulation import SumLossFn, eager_micro_step

log = logging.getLogger("ftcore")

Signature = tuple[tuple[str, tuple[int, ...], torch.dtype], ...]
GraphKey = tuple[Signature, bool]  # (batch signature, whether the graph assigns the gradients)
WARMUP_CALLS = 2  # eager micro-batches of a shape before its capture
MAX_GRAPHS = 4  # distinct batch shapes kept as graphs (two graphs each with accumulation); one memory pool
WAITS_BEFORE_WARNING = 16  # eager micro-batches waiting for a step's first one before the first capture
STEPS_IN_BACKWARD = ("cpu_offload_adamw", "CPUOffloadOptimizer")  # optimizer components refused up front


def check_cuda_graphs(
    device: torch.device,
    *,
    compile: bool,
    activation_offloading: bool,
    sharded: bool,
    optimizer_in_backward: bool,
    optimizer_component: str = "",
    offloaded_blocks: bool = False,
) -> None:
    """Refuse, before anything is built, the runs whose step a CUDA graph cannot capture."""
    if device.type != "cuda":
        raise ValueError(
            f"cuda_graphs: true needs a CUDA GPU, but this run's device is {device}; set cuda_graphs: false"
        )
    if sharded:
        raise ValueError(
            "cuda_graphs: true is not supported under torchrun (FSDP2 runs collectives and hooks in every "
            "step); set cuda_graphs: false"
        )
    if compile:
        raise ValueError(
            "cuda_graphs: true and compile: true cannot be combined: compile already removes most launch "
            "overhead; choose one"
        )
    if activation_offloading:
        raise ValueError(
            "cuda_graphs: true cannot capture enable_activation_offloading (host copies and events in every "
            "step); turn one of them off"
        )
    if offloaded_blocks:
        raise ValueError(
            "cuda_graphs: true cannot capture ac_offload_blocks (host copies from saved-tensor hooks in every "
            "step); turn one of them off"
        )
    if optimizer_component.rsplit(".", 1)[-1] in STEPS_IN_BACKWARD:
        raise ValueError(
            f"cuda_graphs: true cannot capture optimizer `{optimizer_component}`, which steps inside the "
            "backward; use a plain optimizer or cuda_graphs: false"
        )
    if optimizer_in_backward:
        raise ValueError(
            "cuda_graphs: true cannot capture optimizer_in_backward (the optimizer steps inside the backward); "
            "turn one of them off"
        )


def check_graph_safe_optimizer(optimizer) -> None:
    """An optimizer that consumes gradients inside the backward does host work a graph cannot replay."""
    if hasattr(optimizer, "take_grad_norm"):  # OptimizerInBackward, the CPU-offload AdamW
        raise ValueError(
            f"cuda_graphs: true cannot capture {type(optimizer).__name__}, which steps inside the backward "
            "(optimizer_in_backward, ftcore.training.cpu_offload_adamw); use a plain optimizer or cuda_graphs: false"
        )


def batch_signature(batch: Mapping[str, torch.Tensor]) -> Signature:
    """What a graph's static inputs fix: each key's shape and dtype."""
    signature = []
    for key in sorted(batch):
        value = batch[key]
        if not isinstance(value, torch.Tensor):
            raise TypeError(
                f"cuda_graphs: batch key {key!r} holds a {type(value).__name__}; a CUDA graph replays tensors only"
            )
        signature.append((key, tuple(value.shape), value.dtype))
    return tuple(signature)


def parameter_fingerprint(params: list[torch.nn.Parameter]) -> list[tuple[int, bool]]:
    """What a captured graph fixes about the trained parameters: their addresses and trainability."""
    return [(param.data_ptr(), param.requires_grad) for param in params]


def bind_static_grads(params: list[torch.nn.Parameter], static: list[torch.Tensor | None]) -> None:
    """Make each parameter's `.grad` the tensor the graphs add into, keeping its current value.

    None (after `zero_grad(set_to_none=True)`) means zero; a gradient left by an eager micro-batch in
    between is copied in. A parameter without a static tensor (the backward never reaches it) keeps
    None, so the optimizer skips it as in an eager run."""
    cleared = []
    for param, grad in zip(params, static):
        if grad is None or param.grad is grad:
            continue
        if param.grad is None:
            cleared.append(grad)
        else:
            grad.copy_(param.grad)
        param.grad = grad
    if cleared:
        torch._foreach_zero_(cleared)


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    batch: dict[str, torch.Tensor]  # the static inputs each replay reads
    denominator: torch.Tensor  # 0-dim fp32, filled before each replay
    loss_sum: torch.Tensor  # the static output
    # Captured with every .grad None: the gradients it writes (None where its backward never reaches),
    # set as .grad after each replay. None for a graph that adds into the bound static gradients.
    assigned_grads: list[torch.Tensor | None] | None


class CudaGraphedMicroStep:
    """A `MicroStep` (ftcore.training.accumulation) whose forward + backward replay from CUDA graphs."""

    def __init__(
        self,
        sum_loss_fn: SumLossFn,
        params: list[torch.nn.Parameter],
        device: torch.device,
        *,
        warmup_calls: int = WARMUP_CALLS,
        max_graphs: int = MAX_GRAPHS,
        model: torch.nn.Module | None = None,
    ):
        if warmup_calls < 1:  # the warm-up is also what finds the parameters the backward reaches
            raise ValueError(f"CudaGraphedMicroStep needs warmup_calls >= 1, got {warmup_calls}")
        self._sum_loss_fn, self._eager = sum_loss_fn, eager_micro_step(sum_loss_fn)
        self._params, self._device = list(params), device
        self._warmup_calls, self._max_graphs = warmup_calls, max_graphs
        self._graphs: dict[GraphKey, _Captured] = {}
        self._eager_calls: Counter[Signature] = Counter()
        # the static gradients, fixed at the first capture; the signature whose graph assigns them
        self._grads: list[torch.Tensor | None] | None = None
        self._assigning: Signature | None = None
        self._reached = [False] * len(self._params)  # which parameters the warm-up backward gave a gradient
        self._pool = None  # the graphs share one memory pool (torch.cuda.graph_pool_handle())
        self._warned_shapes = False
        self._waits = 0  # micro-batches run eagerly because none had started a step yet
        self._captured_params: list[tuple[int, bool]] | None = None  # (address, requires_grad) at capture
        # the model's modules, whose train/eval modes a graph fixes (dropout draws or not)
        self._modules = list(model.named_modules()) if model is not None else []
        self._captured_modes: list[bool] | None = None
        self._side_stream: torch.cuda.Stream | None = None

    @property
    def num_graphs(self) -> int:
        return len(self._graphs)

    def __call__(self, batch: Mapping[str, torch.Tensor], denominator: int) -> torch.Tensor:
        signature = batch_signature(batch)
        fresh = all(p.grad is None for p in self._params)  # a step's first micro-batch
        # Only the very first capture may allocate the static gradients; every later graph adds into them.
        assigns = fresh and (self._grads is None or self._assigning == signature)
        captured = self._graphs.get((signature, assigns))
        if captured is None and self._grads is not None:
            bind_static_grads(self._params, self._grads)  # an eager backward then adds into them too
        if captured is None:
            graphed_shapes = {key[0] for key in self._graphs}
            if len(graphed_shapes) >= self._max_graphs and signature not in graphed_shapes:
                self._warn_new_shape(signature)
                return self._eager(batch, denominator)
            if self._eager_calls[signature] < self._warmup_calls:
                self._eager_calls[signature] += 1
                return self._warm_up(batch, denominator)
            if self._grads is None and not assigns:  # wait for a step's first micro-batch to capture first
                self._warn_no_fresh_step()
                return self._warm_up(batch, denominator)
            captured = self._capture(batch, assigns)
            self._graphs[(signature, assigns)] = captured
        return self._replay(captured, batch, denominator)

    def _warm_up(self, batch: Mapping[str, torch.Tensor], denominator: int) -> torch.Tensor:
        main = torch.cuda.current_stream(self._device)
        if self._side_stream is None:  # one for all warm-ups: each stream keeps its own cached blocks
            self._side_stream = torch.cuda.Stream(self._device)
        side = self._side_stream
        side.wait_stream(main)
        with torch.cuda.stream(side):
            loss = self._eager(batch, denominator)
        main.wait_stream(side)
        self._reached = [seen or p.grad is not None for seen, p in zip(self._reached, self._params)]
        return loss

    def _capture(self, batch: Mapping[str, torch.Tensor], assigns_grads: bool) -> _Captured:
        # Neither the static gradients (on this stream) nor the graph's private pool can reuse the blocks
        # the warm-ups left cached for the side stream: hand those back first, or the process reserves
        # the step's working memory twice.
        torch.cuda.synchronize(self._device)
        torch.cuda.empty_cache()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()  # type: ignore[assignment]  # an opaque handle
        if not assigns_grads:
            # With every .grad present the captured backward adds into them in place. A parameter that
            # this shape's warm-ups reached but the first graph did not gets a static gradient now:
            # allocated by this capture, it would be freed by zero_grad while the graph still writes it.
            grads = cast(list, self._grads)  # the first capture assigned them
            for index, (param, reached) in enumerate(zip(self._params, self._reached)):
                if reached and grads[index] is None:
                    grads[index] = torch.zeros_like(param)
            bind_static_grads(self._params, grads)
        static_batch = {
            key: torch.empty(value.shape, dtype=value.dtype, device=self._device).copy_(value)
            for key, value in batch.items()
        }
        denominator = torch.ones((), dtype=torch.float32, device=self._device)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self._pool):
                batch_loss, _ = self._sum_loss_fn(static_batch)
                (batch_loss / denominator).backward()
                loss_sum = batch_loss.detach()
        except RuntimeError as error:
            raise RuntimeError(
                f"cuda_graphs: capturing the training step failed ({error}); something in the model or loss "
                "synchronizes with the host or has a shape that depends on the data (a custom loss must not "
                "select the trained positions; LanguageModelLoss(skip_ignored=False) does not). Set cuda_graphs: false"
            ) from error
        assigned = None
        if assigns_grads:  # the tensors the backward allocated in the pool (None where it never reached)
            assigned = [p.grad for p in self._params]
            self._grads, self._assigning = list(assigned), batch_signature(batch)
        if self._captured_params is None:
            self._captured_params = parameter_fingerprint(self._params)
            self._captured_modes = [module.training for _, module in self._modules]
        log.info("cuda_graphs: captured the step for batch %s", _describe(batch_signature(batch)))
        return _Captured(graph, static_batch, denominator, loss_sum, assigned)

    def _check_capture_still_valid(self) -> None:
        # A graph reads and writes fixed addresses: a parameter moved to new memory (`.to()`, a load
        # with assign=True) or (un)frozen after capture would be trained on stale memory, silently;
        # a module switched to eval would still be trained as captured (with dropout), silently.
        now = parameter_fingerprint(self._params)
        if self._captured_params is not None and now != self._captured_params:
            changed = next(i for i, (a, b) in enumerate(zip(now, self._captured_params)) if a != b)
            raise RuntimeError(
                f"cuda_graphs: trained parameter {changed} was moved to new memory or had requires_grad "
                "changed after the step was captured, so the graph would use stale memory; keep the "
                "parameters in place during training, or set cuda_graphs: false"
            )
        if self._captured_modes is not None:
            for (name, module), captured in zip(self._modules, self._captured_modes):
                if module.training != captured:
                    raise RuntimeError(
                        f"cuda_graphs: module `{name or 'model'}` was switched to "
                        f"{'train' if module.training else 'eval'} mode after the step was captured in "
                        f"{'train' if captured else 'eval'} mode, and the graph replays the captured one; call "
                        "model.train() before training steps (evaluation runs outside the graph)"
                    )

    def _replay(
        self, captured: _Captured, batch: Mapping[str, torch.Tensor], denominator: int
    ) -> torch.Tensor:
        self._check_capture_still_valid()
        if captured.assigned_grads is None:
            bind_static_grads(self._params, cast(list, self._grads))  # set by the first capture
        for key, value in batch.items():
            captured.batch[key].copy_(value, non_blocking=True)
        captured.denominator.fill_(float(denominator))
        captured.graph.replay()
        # Only what this graph wrote: a static gradient added later for another shape's parameters
        # still holds the last step's values, and an eager step would leave those .grad None.
        for param, grad in zip(self._params, captured.assigned_grads or ()):
            param.grad = grad
        return captured.loss_sum.clone()

    def _warn_no_fresh_step(self) -> None:
        self._waits += 1
        if self._waits == WAITS_BEFORE_WARNING:
            log.warning(
                "cuda_graphs: %d micro-batches ran eagerly waiting for one that starts a step with every .grad "
                "None, which the first graph is captured from; clear gradients with zero_grad(set_to_none=True)",
                self._waits,
            )

    def _warn_new_shape(self, signature: Signature) -> None:
        if not self._warned_shapes:
            self._warned_shapes = True
            log.warning(
                "cuda_graphs: %d batch shapes are captured already; new shapes (first: %s) run eagerly. Pack "
                "batches to one length (dataset.packed: true) to keep every step in a graph",
                self._max_graphs,
                _describe(signature),
            )


def graphed_micro_step(
    sum_loss_fn: SumLossFn,
    params: list[torch.nn.Parameter],
    optimizer,
    device: torch.device,
    model: torch.nn.Module | None = None,
) -> CudaGraphedMicroStep:
    """The `cuda_graphs` micro-step of a run whose settings `check_cuda_graphs` passed; `model` lets
    each replay check that no module's train/eval mode changed since the capture."""
    check_graph_safe_optimizer(optimizer)
    return CudaGraphedMicroStep(sum_loss_fn, params, device, model=model)


def _describe(signature: Signature) -> str:
    return ", ".join(f"{key} {list(shape)}" for key, shape, _ in signature)
