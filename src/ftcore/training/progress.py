"""The tqdm progress bar: loss, lr, tokens/s; tqdm itself shows the ETA from the step rate."""

from __future__ import annotations

import time

from tqdm import tqdm


class ProgressBar:
    def __init__(
        self, total_steps: int, initial_step: int = 0, disable: bool = False, desc: str = "train", file=None
    ):
        self.bar = tqdm(
            total=total_steps, initial=initial_step, disable=disable, desc=desc, dynamic_ncols=True, file=file
        )
        self._last_time = time.perf_counter()

    def update(self, loss: float, lr: float, num_tokens: int, steps: int = 1) -> float:
        """Advance by `steps`; returns tokens/s over the interval since the previous update."""
        now = time.perf_counter()
        tokens_per_second = num_tokens / max(now - self._last_time, 1e-9)
        self._last_time = now
        self.bar.set_postfix(
            loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_second:,.0f}", refresh=False
        )
        self.bar.update(steps)
        return tokens_per_second

    def close(self) -> None:
        self.bar.close()


def peak_memory_gib(device) -> float:
    """Peak memory allocated by tensors on a CUDA device since the last reset, in GiB (0.0 elsewhere)."""
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return 0.0
    return torch.cuda.max_memory_allocated(device) / 2**30
