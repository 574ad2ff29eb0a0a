"""ftcore's training-step benchmark, under the peer's protocol (../shared/peer/torchtune_step_bench.py).

Protocol (the same for ftcore and torchtune, so that only ratios measured in one run are compared):
random-init weights in bf16, random token ids in [0, 128000), fused AdamW (lr 3e-4) on the trainable
parameters, LoRA rank 8 / alpha 16 on q, k, v, output projections and the MLP, chunked cross-entropy,
`--warm` untimed steps then `--steps` timed steps; the median step time gives tokens/s; peak memory is
torch.cuda.max_memory_allocated() after the model and optimizer are built.

ftcore's own pieces are used as a recipe uses them: the builders on the meta device, `to_empty` +
`init_weights`, the adapter helpers, `parallelize` (activation checkpointing, per-block compile) and
`LanguageModelLoss`. QLoRA bases get random float weights quantized to NF4 while loading, one
projection at a time, as a real checkpoint would be.

MFU = model FLOPs per step / step time / the card's bf16 matmul rate measured in this same process
(a large bf16 matmul on random data). Model FLOPs per token, with N_mm the weights used in matmuls
(block projections, LoRA adapters, output head; embedding lookups are no matmul) and N_train those
of them that are trained:
    forward 2 N_mm  +  input gradients 2 N_mm  +  weight gradients 2 N_train
    + causal attention: forward 2 T d_attn, backward 4 T d_attn per layer (d_attn = heads * head_dim)
Full fine-tuning is thus the usual 6 N + attention; LoRA trains only the adapters, so it is ~4 N.
Recomputation by activation checkpointing and NF4 dequantization are not counted (they are not model
FLOPs). With a frozen embedding autograd skips the first block's q/k/v input gradients, which this
count includes (under 0.2% of an 8B LoRA step); tests/scripts/test_bench.py checks the count against
torch's FlopCounterMode.

Usage:
  python scripts/bench.py --mode lora --model llama3_1_8b --bs 2 --seq 2048 --ac [--compile] [--fused]
  python scripts/bench.py --generate 128 --model llama3_2_1b          # decode speed, batch 1
  python scripts/bench.py --table results.jsonl                        # side-by-side markdown table
Prints one line `RESULT {json}` (the peer's format) and writes the same JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

MODELS = ("llama3_1_8b", "llama3_1_70b", "llama3_2_3b", "llama3_2_1b", "tiny")
OPTIMIZERS = ("adamw", "adamw8bit", "cpu_offload")  # --optimizer; adamw (fused) is the protocol's
LORA_ATTN_MODULES = ["q_proj", "k_proj", "v_proj", "output_proj"]
TOKEN_ID_HIGH = 128_000  # the protocol's token ids lie in [0, 128000)
# A small Llama for CPU smoke tests: every in_dim divides by the NF4 block (64), so QLoRA builds too.
TINY_SIZES = dict(
    vocab_size=1024, dim=128, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=256, max_seq_len=512
)  # fmt: skip
FLOPS_NOTE = (
    "model FLOPs/token = 2*N_mm (fwd) + 2*N_mm (input grads) + 2*N_trainable_mm (weight grads) "
    "+ causal attention 6*T*heads*head_dim per layer; N_mm = block projections + LoRA adapters + "
    "output head (no embedding lookup); AC recompute and NF4 dequantization not counted"
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mode", default="lora", choices=["full", "lora", "qlora"])
    p.add_argument("--model", default="llama3_1_8b", choices=MODELS)
    p.add_argument("--bs", type=int, default=2)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--ac", action="store_true", help="activation checkpointing per transformer block")
    p.add_argument(
        "--ac-option",
        help="with --ac: selective checkpointing (ac_mode: selective): 'op' keeps GEMM and attention outputs, "
        "an int K checkpoints every K-th block",
    )
    p.add_argument(
        "--ac-skip-last", type=int, help="with --ac: the last N blocks unchecked (ac_skip_last_blocks)"
    )
    p.add_argument(
        "--ac-offload-blocks",
        type=int,
        help="with --ac: N blocks unchecked, their saved activations in host memory (ac_offload_blocks)",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile each block (ftcore's parallelize)")
    p.add_argument("--fused", action="store_true", help="Triton RMSNorm/SwiGLU/RoPE kernels (fused_kernels)")
    p.add_argument("--offload", action="store_true", help="with --ac: block inputs in pinned host memory")
    p.add_argument(
        "--cuda-graphs", action="store_true", help="eager: replay forward + backward from a CUDA graph"
    )
    p.add_argument(
        "--offload-embedding",
        action="store_true",
        help="frozen token embedding in host memory (offload_embedding)",
    )
    p.add_argument("--mlp-chunk", type=int, help="MLP in checkpointed N-token chunks (mlp_chunk_tokens)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--n-layers", type=int, help="keep only the first N transformer blocks of the shape")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warm", type=int, default=3)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--optimizer", default="adamw", choices=list(OPTIMIZERS), help="default: fused AdamW")
    p.add_argument("--optimizer-in-backward", action="store_true", help="step each param in the backward")
    p.add_argument("--loss-chunk", type=int, default=1024, help="tokens per chunk of the cross-entropy")
    p.add_argument("--device", default="cuda")
    p.add_argument("--generate", type=int, default=0, help="instead of training, decode this many tokens")
    p.add_argument("--prompt-len", type=int, default=128, help="prompt length for --generate")
    p.add_argument("--out", type=Path, help="also write the result JSON here")
    p.add_argument(
        "--profile", type=Path, help="after the timed steps, profile one step; write its kernel table here"
    )
    p.add_argument(
        "--memory-cap-gib",
        type=float,
        help="fail (OOM) past this much GPU memory, e.g. 79 to stand for an 80 GB card on a larger one",
    )
    p.add_argument("--table", type=Path, help="print the side-by-side table of a JSONL of RESULTs and exit")
    args = p.parse_args(argv)
    for name in ("bs", "seq", "rank", "steps", "loss_chunk"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warm < 0:
        raise ValueError(f"--warm must be >= 0, got {args.warm}")
    return args


def _builder(name: str, lora: bool):
    """The size's builder from ftcore.models, or the bench's tiny shape."""
    import ftcore.models

    if name == "tiny":
        from functools import partial

        base = ftcore.models.lora_transformer_decoder if lora else ftcore.models.transformer_decoder
        return partial(base, **TINY_SIZES)
    return getattr(ftcore.models, f"lora_{name}" if lora else name)


def build_model(
    name: str, mode: str, rank: int, device: torch.device, n_layers: int | None = None
) -> nn.Module:
    """Build on meta under bf16, materialize on `device`, random-init; QLoRA bases quantized on load.
    `n_layers` keeps only the first blocks (same shapes, fewer of them): a cheap stand-in for measuring
    how one block's working set grows with the sequence length."""
    import ftcore.models

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("meta"):
            if mode == "full":
                model = _builder(name, lora=False)()
            else:
                model = _builder(name, lora=True)(
                    lora_attn_modules=LORA_ATTN_MODULES,
                    apply_lora_to_mlp=True,
                    lora_rank=rank,
                    lora_alpha=2 * rank,
                    quantize_base=mode == "qlora",
                )
            if n_layers is not None:
                model.layers = model.layers[:n_layers]
        model.to_empty(device=device)
        with torch.no_grad():
            ftcore.models.init_weights(model)
            if mode == "qlora" and device.type != "meta":  # on meta (FLOP counting) there is nothing to fill
                load_random_nf4_bases(model, device)
    finally:
        torch.set_default_dtype(previous)
    if mode != "full":
        from ftcore.modules.lora import get_adapter_params, set_trainable_params

        set_trainable_params(model, get_adapter_params(model))
    return model


def _nf4_base_modules(model: nn.Module):
    """Modules whose frozen base weight is stored in NF4 (LoRALinear(quantize_base) and bare NF4Linear)."""
    from ftcore.modules.lora import LoRALinear
    from ftcore.modules.nf4 import NF4Linear

    lora_prefixes = []
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear) and module.quantize_base:
            lora_prefixes.append(name + ".")
            yield module
        elif isinstance(module, NF4Linear) and not any(name.startswith(p) for p in lora_prefixes):
            yield module


def load_random_nf4_bases(model: nn.Module, device: torch.device, std: float = 0.02) -> None:
    """Give every NF4 base a normal(0, std) float weight through its load hook, which quantizes it.

    One projection at a time, so the float copy of only one weight is ever alive (70B fits one GPU).
    """
    for module in _nf4_base_modules(model):
        weight = torch.randn(module.out_dim, module.in_dim, device=device, dtype=torch.bfloat16) * std
        module.load_state_dict({"weight": weight}, strict=False)


def _matmul_weight_counts(model: nn.Module) -> tuple[int, int]:
    """(N_mm, N_trainable_mm): weights used in matmuls per token, and how many of them are trained."""
    from ftcore.modules.lora import LoRALinear
    from ftcore.modules.nf4 import NF4Linear

    total = trainable = 0
    lora_prefixes: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            lora_prefixes.append(name + ".")
            total += module.in_dim * module.out_dim  # the frozen base; lora_a / lora_b are nn.Linear children
        elif isinstance(module, NF4Linear) and not any(name.startswith(p) for p in lora_prefixes):
            total += module.in_dim * module.out_dim
        elif isinstance(module, nn.Linear):
            total += module.weight.numel()
            trainable += module.weight.numel() if module.weight.requires_grad else 0
    if model.output is None:  # tied head: the embedding matrix is also the output projection
        head = model.tok_embeddings.weight
        total += head.numel()
        trainable += head.numel() if head.requires_grad else 0
    return total, trainable


def model_flops_per_step(model: nn.Module, batch: int, seq: int, causal: bool = True) -> int:
    """Model FLOPs of one training step (see the module docstring for what is counted)."""
    n_mm, n_train = _matmul_weight_counts(model)
    attn_dim_sum = sum(layer.attn.n_heads * layer.attn.head_dim for layer in model.layers)
    # Per token: QK^T and AV each cost 2 * context * d_attn forward; causal context averages T / 2.
    context = seq / 2 if causal else seq
    attn_forward = 2 * 2 * context * attn_dim_sum
    per_token = 2 * n_mm + 2 * n_mm + 2 * n_train + 3 * attn_forward  # backward = 2 x forward for attention
    return int(per_token * batch * seq)


def measure_matmul_peak_tflops(device: torch.device, dtype=torch.bfloat16) -> float:
    """The card's dense matmul rate, measured: median of timed n^3 products on random data."""
    n = 8192 if device.type == "cuda" else 512
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    times = []
    for i in range(13):
        _sync(device)
        start = time.perf_counter()
        a @ b
        _sync(device)
        if i >= 3:
            times.append(time.perf_counter() - start)
    del a, b
    if device.type == "cuda":
        torch.cuda.empty_cache()  # keep the probe's buffers out of the run's reserved-memory figure
    return 2 * n**3 / statistics.median(times) / 1e12


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _memory_fields(device: torch.device) -> dict:
    if device.type != "cuda":
        return dict(peak_alloc_gib=None, peak_reserved_gib=None, gpu="cpu")
    return dict(
        peak_alloc_gib=round(torch.cuda.max_memory_allocated(device) / 2**30, 2),
        peak_reserved_gib=round(torch.cuda.max_memory_reserved(device) / 2**30, 2),
        gpu=torch.cuda.get_device_name(device),
    )


def _resolve_device(name: str) -> torch.device:
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but no CUDA GPU is visible; pass --device cpu")
    return device


def build_optimizer(params: list, lr: float, name: str, in_backward: bool) -> torch.optim.Optimizer:
    """Fused AdamW (the protocol's), torchao's 8-bit AdamW or its CPU-offload AdamW; with `in_backward`
    one per parameter, stepped in the backward (ftcore's `optimizer_in_backward`)."""
    from ftcore.training import OptimizerInBackward, adamw_8bit, cpu_offload_adamw

    make = {
        "adamw": lambda ps: torch.optim.AdamW(ps, lr=lr, fused=True),
        "adamw8bit": lambda ps: adamw_8bit(ps, lr=lr),
        "cpu_offload": lambda ps: cpu_offload_adamw(ps, lr=lr),
    }[name]
    return OptimizerInBackward(params, make) if in_backward else make(params)


def build_micro_step(args: argparse.Namespace, model, loss_fn, params: list, optimizer, device: torch.device):
    """The recipe's micro-step (ftcore.training.accumulation): eager, or replayed from CUDA graphs."""
    from ftcore.training.accumulation import eager_micro_step
    from ftcore.training.cuda_graphs import check_cuda_graphs, graphed_micro_step

    def sum_loss(batch):
        return loss_fn(model, batch)

    if not args.cuda_graphs:
        return eager_micro_step(sum_loss)
    check_cuda_graphs(
        device,
        compile=args.compile,
        activation_offloading=args.offload,
        sharded=False,
        optimizer_in_backward=args.optimizer_in_backward,
        offloaded_blocks=bool(args.ac_offload_blocks),
    )
    return graphed_micro_step(sum_loss, params, optimizer, device, model)


def _ac_option(value: str | None) -> str | int | None:
    """--ac-option as the config's ac_option: 'op', or the int K."""
    return int(value) if value is not None and value.isdigit() else value


def run_training(args: argparse.Namespace) -> dict:
    from ftcore.distributed.parallelize import parallelize
    from ftcore.runner.loss import LanguageModelLoss

    device = _resolve_device(args.device)
    if args.memory_cap_gib and device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        index = device.index if device.index is not None else torch.cuda.current_device()
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_cap_gib * 2**30 / total), index)
    peak_tflops = measure_matmul_peak_tflops(device)
    torch.manual_seed(0)
    start = time.time()
    model = build_model(args.model, args.mode, args.rank, device, args.n_layers)
    parallelize(
        model,
        activation_checkpointing=args.ac,
        ac_mode="selective" if args.ac_option else None,
        ac_option=_ac_option(args.ac_option),
        ac_skip_last_blocks=args.ac_skip_last,
        ac_offload_blocks=args.ac_offload_blocks,
        compile=args.compile,
        fused_kernels=args.fused,
        activation_offloading=args.offload,
        mlp_chunk_tokens=args.mlp_chunk,
        offload_embedding=args.offload_embedding,
    )
    build_s = time.time() - start
    loss_fn = LanguageModelLoss(chunk_size=args.loss_chunk, skip_ignored=not args.cuda_graphs)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, args.lr, args.optimizer, args.optimizer_in_backward)
    micro_step = build_micro_step(args, model, loss_fn, params, optimizer, device)
    trained_tokens = args.bs * (args.seq - 1)  # labels = tokens, none ignored: the loss's own count
    vocab = model.tok_embeddings.num_embeddings
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def train_step(tokens: torch.Tensor) -> torch.Tensor:
        loss_sum = micro_step({"tokens": tokens, "labels": tokens}, trained_tokens)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss_sum / trained_tokens

    step_times, loss = [], None
    warm_start = time.perf_counter()
    for i in range(args.warm + args.steps):
        tokens = torch.randint(0, min(TOKEN_ID_HIGH, vocab), (args.bs, args.seq), device=device)
        _sync(device)
        step_start = time.perf_counter()
        loss = train_step(tokens)
        _sync(device)
        if i == args.warm - 1:
            warmup_s = time.perf_counter() - warm_start
        if i >= args.warm:
            step_times.append(time.perf_counter() - step_start)
    if args.profile:
        _profile_one_step(args, lambda tokens: train_step(tokens), vocab, device)
    step_s = sorted(step_times)[len(step_times) // 2]  # the peer's median: the upper middle of an even count
    flops = model_flops_per_step(model, args.bs, args.seq)
    return dict(
        system=_system_name(),
        model=args.model,
        mode=args.mode,
        bs=args.bs,
        seq=args.seq,
        ac=args.ac,
        ac_option=_ac_option(args.ac_option),
        ac_skip_last=args.ac_skip_last,
        ac_offload_blocks=args.ac_offload_blocks,
        compile=args.compile,
        fused=args.fused,
        offload=args.offload,
        cuda_graphs=args.cuda_graphs,
        mlp_chunk=args.mlp_chunk,
        offload_embedding=args.offload_embedding,
        n_layers=len(model.layers),
        optimizer=args.optimizer,
        optimizer_in_backward=args.optimizer_in_backward,
        trainable_params=sum(p.numel() for p in params),
        build_s=round(build_s, 1),
        warmup_s=round(warmup_s, 1) if args.warm else 0.0,
        step_s=round(step_s, 4),
        step_times_s=[round(t, 4) for t in step_times],
        tokens_per_s=round(args.bs * args.seq / step_s, 1),
        **_memory_fields(device),
        last_loss=round(float(loss.detach()), 4),
        flops_per_step=flops,
        matmul_peak_tflops=round(peak_tflops, 3),
        mfu=round(flops / step_s / (peak_tflops * 1e12), 4),
        flops_note=FLOPS_NOTE,
    )


def _profile_one_step(args, train_step, vocab: int, device: torch.device) -> None:
    """One more step under torch.profiler: the kernels that dominate it, by device time, to args.profile."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    tokens = torch.randint(0, min(TOKEN_ID_HIGH, vocab), (args.bs, args.seq), device=device)
    with profile(activities=activities, record_shapes=True) as prof:
        train_step(tokens)
        _sync(device)
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    args.profile.parent.mkdir(parents=True, exist_ok=True)
    kernels = prof.key_averages().table(sort_by=sort_by, row_limit=40, max_name_column_width=70)
    args.profile.write_text(kernels + _memory_bound_ops_table(prof, sort_by))


# The PyTorch ops whose kernels are memory-bound passes over activations (under a CUDA graph the ops are
# hidden, so this table is only informative for eager runs): which shapes the copies and adds come from.
MEMORY_BOUND_OPS = ("aten::copy_", "aten::add", "aten::add_", "aten::clone", "aten::mul", "aten::cat")


def _memory_bound_ops_table(prof, sort_by: str) -> str:
    rows = [e for e in prof.key_averages(group_by_input_shape=True) if e.key in MEMORY_BOUND_OPS]
    if not rows:
        return ""
    rows.sort(key=lambda e: -getattr(e, sort_by, 0))
    lines = ["", "copies, adds and products by input shape (self device time, calls):"]
    for event in rows[:40]:
        device_us = getattr(event, sort_by, 0)
        lines.append(f"{event.key:14s} {device_us / 1e3:9.3f} ms {event.count:6d}  {event.input_shapes}")
    return "\n".join(lines) + "\n"


@torch.no_grad()
def run_generation(args: argparse.Namespace) -> dict:
    """Greedy decoding at batch 1 through `ftcore.models.generate` (KV cache, no stop tokens).

    Prefill time is that of a 1-token generation; decode speed is (N - 1) tokens over the rest of an
    N-token generation. Each is the median of 3 timed calls after an identical untimed one.
    """
    from ftcore.models import generate

    if args.generate < 2:
        raise ValueError(f"--generate must be >= 2 to time decoding, got {args.generate}")
    device = _resolve_device(args.device)
    torch.manual_seed(0)
    model = build_model(args.model, "full", args.rank, device).eval()
    vocab = model.tok_embeddings.num_embeddings
    prompt = torch.randint(0, min(TOKEN_ID_HIGH, vocab), (args.prompt_len,)).tolist()

    def timed_generate(new_tokens: int, repeats: int = 3) -> float:
        generate(model, [prompt], new_tokens)  # untimed warm-up of the same shapes
        times = []
        for _ in range(repeats):
            _sync(device)
            start = time.perf_counter()
            out = generate(model, [prompt], new_tokens)
            _sync(device)
            times.append(time.perf_counter() - start)
            if len(out[0]) != new_tokens:
                raise RuntimeError(f"generate returned {len(out[0])} tokens, expected {new_tokens}")
        return statistics.median(times)

    prefill_s = timed_generate(1)
    total_s = timed_generate(args.generate)
    if total_s <= prefill_s:
        raise RuntimeError(
            f"decoding {args.generate} tokens took no longer than the prefill ({total_s:.4f} s vs "
            f"{prefill_s:.4f} s): timing noise dominates; pass a larger --generate"
        )
    return dict(
        system=_system_name(),
        kind="generate",
        model=args.model,
        bs=1,
        prompt_len=args.prompt_len,
        new_tokens=args.generate,
        prefill_tokens_per_s=round(args.prompt_len / prefill_s, 1),
        decode_tokens_per_s=round((args.generate - 1) / (total_s - prefill_s), 1),
        total_s=round(total_s, 3),
        **_memory_fields(device),
    )


def _ratio(numerator, denominator) -> str:
    return f"{numerator / denominator:.2f}x" if numerator and denominator else "-"


def _fmt(value, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _config_key(r: dict) -> tuple:
    return (r["model"], r["mode"], r["bs"], r["seq"], r["ac"])


def _is_peer(r: dict) -> bool:
    return r["system"].startswith("torchtune")


def render_table(results_jsonl: Path) -> str:
    """Markdown: one row per ftcore run, beside torchtune's runs of the same model/mode/batch/AC.

    Ratios are ftcore / torchtune (tokens/s: higher is better; memory: lower is better). Peer runs
    with no ftcore counterpart get a row of their own so that no measured figure is dropped.
    """
    records = [json.loads(line) for line in results_jsonl.read_text().splitlines() if line.strip()]
    runs = [r for r in records if "tokens_per_s" in r and "kind" not in r]
    peer: dict[tuple, dict[bool, dict]] = {}
    for r in filter(_is_peer, runs):
        peer.setdefault(_config_key(r), {})[r["compile"]] = r
    rows = [
        "| model | mode | bs x seq | AC | ftcore compile | ftcore tok/s | ftcore GiB | ftcore MFU "
        "| tt eager tok/s | tt compiled tok/s | tt compiled GiB "
        "| tok/s vs tt compiled | tok/s vs tt eager | memory vs tt compiled |",
        "|---" * 14 + "|",
    ]
    ours = [r for r in runs if not _is_peer(r)]
    for r in ours:
        eager, compiled = (peer.get(_config_key(r), {}).get(flag, {}) for flag in (False, True))
        rows.append(
            f"| {r['model']} | {r['mode']} | {r['bs']} x {r['seq']} | {_ac_column(r)} | {_yes(r['compile'])}{' +fused' if r.get('fused') else ''}{' +graphs' if r.get('cuda_graphs') else ''}{_memory_note(r, ' +')} "
            f"| {_fmt(r['tokens_per_s'])} | {_fmt(r['peak_alloc_gib'], 2)} | {_fmt(r.get('mfu'), 3)} "
            f"| {_fmt(eager.get('tokens_per_s'))} | {_fmt(compiled.get('tokens_per_s'))} "
            f"| {_fmt(compiled.get('peak_alloc_gib'), 2)} | {_ratio(r['tokens_per_s'], compiled.get('tokens_per_s'))} "
            f"| {_ratio(r['tokens_per_s'], eager.get('tokens_per_s'))} "
            f"| {_ratio(r['peak_alloc_gib'], compiled.get('peak_alloc_gib'))} |"
        )
    ours_keys = {_config_key(r) for r in ours}
    for key, by_compile in peer.items():
        if key in ours_keys:
            continue
        eager, compiled = by_compile.get(False, {}), by_compile.get(True, {})
        rows.append(
            f"| {key[0]} | {key[1]} | {key[2]} x {key[3]} | {_yes(key[4])} | (not run) | - | - | - "
            f"| {_fmt(eager.get('tokens_per_s'))} | {_fmt(compiled.get('tokens_per_s'))} "
            f"| {_fmt(compiled.get('peak_alloc_gib'), 2)} | - | - | - |"
        )
    return "\n".join(rows)


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _ac_column(r: dict) -> str:
    """yes / no, or what is checkpointed: 'op' (GEMM outputs kept), 'every K', '-last N' (unchecked),
    '-host N' (N blocks unchecked with their activations in host memory)."""
    option, skip, host = r.get("ac_option"), r.get("ac_skip_last"), r.get("ac_offload_blocks")
    if not r["ac"] or (option is None and not skip and not host):
        return _yes(r["ac"])
    kept = {None: "yes", "op": "op"}.get(option, f"every {option}")
    return kept + (f" -last {skip}" if skip else "") + (f" -host {host}" if host else "")


def _system_name() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"ftcore-{version('ftcore')}"
    except PackageNotFoundError:  # run from a source tree on PYTHONPATH (the GPU machine)
        return "ftcore-src"


def _optimizer_note(r: dict) -> str:
    """' optimizer=NAME' when not the default fused AdamW, ' in-backward' when stepped in the backward."""
    name = r.get("optimizer", "adamw")
    in_backward = " in-backward" if r.get("optimizer_in_backward") else ""
    return (f" optimizer={name}" if name != "adamw" else "") + in_backward


def _memory_note(r: dict, separator: str = " ") -> str:
    """'offload', 'mlp_chunk=N' and 'offload_embedding', each after `separator`, for the memory switches on."""
    notes = [
        "offload" if r.get("offload") else "",
        f"mlp_chunk={r['mlp_chunk']}" if r.get("mlp_chunk") else "",
        "offload_embedding" if r.get("offload_embedding") else "",
    ]
    return "".join(separator + note for note in notes if note)


def _summary(r: dict) -> str:
    memory = "" if r["peak_alloc_gib"] is None else f", peak {r['peak_alloc_gib']} GiB allocated"
    if r.get("kind") == "generate":
        return f"{r['system']} {r['model']} generate bs 1: {r['decode_tokens_per_s']:,} tokens/s decoding{memory}"
    return (
        f"{r['system']} {r['model']} {r['mode']} bs {r['bs']} x {r['seq']} ac={_ac_column(r)} compile={r['compile']}"
        f"{' fused' if r.get('fused') else ''}{' cuda_graphs' if r.get('cuda_graphs') else ''}"
        f"{_optimizer_note(r)}{_memory_note(r)}: "
        f"{r['tokens_per_s']:,} tokens/s{memory}, MFU {r['mfu']:.3f} of a measured "
        f"{r['matmul_peak_tflops']:,} TFLOP/s; warm-up (incl. compile) {r['warmup_s']} s"
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.table:
        print(render_table(args.table))
        return 0
    result = run_generation(args) if args.generate else run_training(args)
    line = json.dumps(result)
    print(_summary(result), flush=True)
    print("RESULT", line, flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
