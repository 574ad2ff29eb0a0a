"""GPU checks for the LoRA/QLoRA recipes' outputs and training steps (closing-note numbers).

(a) a PEFT adapter exported by ftcore, loaded with `peft.PeftModel.from_pretrained` on the HF model,
    gives ftcore's logits; (b) a merged export loads in `transformers` with ftcore's merged logits;
(c) LoRA and QLoRA training steps of random-init Llama-3.2-1B with bf16, activation checkpointing and
    torch.compile: loss finite and falling on a repeated batch, step time, peak memory;
(d) batch-1 greedy decoding speed of random-init Llama-3.2-1B (eager and compiled decode step).
Each part runs in its own try/except and the JSON is rewritten after each, so one failure (or a
timeout) hides nothing else.

    python scripts/gpu_recipe_checks.py --out /tmp/recipe_checks.json          # H100, < 3 minutes
    python scripts/gpu_recipe_checks.py --device cpu --tiny --out /tmp/x.json  # CPU smoke test
"""

from __future__ import annotations

import argparse
import functools
import json
import tempfile
import time
import traceback
from pathlib import Path

import torch

import ftcore.models as M
from ftcore.modules.lora import (
    disable_adapters,
    get_adapter_params,
    get_merged_state_dict,
    set_trainable_params,
)
from ftcore.runner.setup import default_dtype
from ftcore.training import save_peft_adapter

LORA_ATTN = ["q_proj", "k_proj", "v_proj", "output_proj"]
RANK, ALPHA = 8, 16.0
# Llama-3.2-1B's published config, cut to 2 layers for (a)/(b); the tiny one is for the CPU smoke test.
HF_SIZES = {
    "full": dict(vocab_size=128_256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=2,
                 num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131_072,
                 rope_theta=500_000.0, tie_word_embeddings=True, rms_norm_eps=1e-5,
                 rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    "tiny": dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                 rope_theta=500_000.0, tie_word_embeddings=True, rms_norm_eps=1e-5),
}  # fmt: skip


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def make_hf_checkpoint(path: Path, size: str, dtype: torch.dtype):
    import transformers

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**HF_SIZES[size]))
    with torch.no_grad():  # non-trivial norms, so a dropped or misnamed norm shows in the logits
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(1.0, 0.1)
    model.to(dtype).save_pretrained(path)
    return model


def load_lora_ftcore(path: Path, device: str, dtype: torch.dtype) -> M.TransformerDecoder:
    """HF checkpoint -> ftcore LoRA model on every projection, adapters filled with random numbers
    (B != 0, so the adapter really changes the logits)."""
    with default_dtype(dtype), torch.device("meta"):
        model = M.lora_from_hf_config(
            str(path), LORA_ATTN, apply_lora_to_mlp=True, lora_rank=RANK, lora_alpha=ALPHA
        )
    model.to_empty(device=device)
    M.init_weights(model)
    M.HFCheckpointer(str(path)).load_into(model)
    torch.manual_seed(1)
    with torch.no_grad():
        for param in get_adapter_params(model).values():
            param.normal_(0.0, 0.05)
    return model.eval()


def peft_parity(tmp: Path, size: str, device: str, dtype: torch.dtype, tokens: torch.Tensor) -> dict:
    from peft import PeftModel

    hf_model = make_hf_checkpoint(tmp / "hf", size, dtype)
    model = load_lora_ftcore(tmp / "hf", device, dtype)
    save_peft_adapter(model, tmp / "adapter", rank=RANK, alpha=ALPHA)
    peft_model = PeftModel.from_pretrained(hf_model.to(device), tmp / "adapter").eval()
    with torch.no_grad():
        ours, theirs = model(tokens), peft_model(tokens).logits
        # the same comparison with the adapters off: the noise floor of this dtype between the two stacks
        with disable_adapters(model), peft_model.disable_adapter():
            ours_base, theirs_base = model(tokens), peft_model(tokens).logits
    return dict(
        max_abs_diff=max_abs_diff(ours, theirs),
        without_adapters_max_abs_diff=max_abs_diff(ours_base, theirs_base),
        adapter_effect_max_abs=max_abs_diff(theirs, theirs_base),
        logits_max_abs=float(theirs.abs().max()),
    )


def check_peft(args, device: str) -> dict:
    """(a): bf16 against the 1e-3 target, and fp32, which separates export errors from bf16 rounding."""
    size = "tiny" if args.tiny else "full"
    tokens = torch.randint(0, HF_SIZES[size]["vocab_size"], (2, 64), device=device)
    result = {}
    for dtype in (torch.bfloat16, torch.float32):
        with tempfile.TemporaryDirectory() as tmp:
            result[str(dtype).removeprefix("torch.")] = peft_parity(Path(tmp), size, device, dtype, tokens)
    result["passed"] = result["bfloat16"]["max_abs_diff"] <= 1e-3 or result["float32"]["max_abs_diff"] <= 1e-4
    result["note"] = (
        "bf16 logits round to 8 bits of mantissa (one ulp is 0.0078 for |logit| in [1, 2)), so two stacks "
        "with different op orders differ by about an ulp with or without adapters "
        "(without_adapters_max_abs_diff); the fp32 diff shows whether the exported adapter itself matches"
    )
    return result


def check_merged_export(args, device: str) -> dict:
    """(b): get_merged_state_dict -> HFCheckpointer.save -> transformers loads the same logits."""
    import transformers

    size = "tiny" if args.tiny else "full"
    tokens = torch.randint(0, HF_SIZES[size]["vocab_size"], (2, 64), device=device)
    result = {}
    for dtype in (torch.bfloat16, torch.float32):
        with tempfile.TemporaryDirectory() as tmp:
            make_hf_checkpoint(Path(tmp) / "hf", size, dtype)
            model = load_lora_ftcore(Path(tmp) / "hf", device, dtype)
            M.HFCheckpointer(str(Path(tmp) / "hf")).save(get_merged_state_dict(model), Path(tmp) / "merged")
            merged = transformers.AutoModelForCausalLM.from_pretrained(Path(tmp) / "merged", dtype=dtype)
            with torch.no_grad():
                diff = max_abs_diff(model(tokens), merged.to(device).eval()(tokens).logits)
        result[str(dtype).removeprefix("torch.")] = dict(max_abs_diff=diff)
    result["passed"] = result["float32"]["max_abs_diff"] <= 1e-3
    return result


def build_training_model(args, device: str, quantize_base: bool) -> M.TransformerDecoder:
    from ftcore.distributed.parallelize import parallelize

    # NF4 quantizes blocks of 64 along the input dim, so the tiny MLP width is a multiple of 64
    builder = functools.partial(M.lora_tiny_llama, hidden_dim=256) if args.tiny else M.lora_llama3_2_1b
    with default_dtype(torch.bfloat16), torch.device("meta"):
        model = builder(
            LORA_ATTN, apply_lora_to_mlp=True, lora_rank=RANK, lora_alpha=ALPHA, quantize_base=quantize_base
        )
    model.to_empty(device=device)
    M.init_weights(model)
    set_trainable_params(model, get_adapter_params(model).keys())
    return parallelize(model, activation_checkpointing=True, compile=not args.no_compile)


def check_training(args, device: str, quantize_base: bool) -> dict:
    """(c): 10 AdamW steps over the adapters on one repeated random batch."""
    from ftcore.runner.loss import LanguageModelLoss

    torch.manual_seed(0)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model = build_training_model(args, device, quantize_base)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr)
    loss_fn = LanguageModelLoss()
    seq = 64 if args.tiny else args.seq
    tokens = torch.randint(0, model.tok_embeddings.num_embeddings, (args.bs, seq), device=device)
    batch = {"tokens": tokens, "labels": tokens}
    losses, step_s = [], []
    for _ in range(args.steps):
        start = time.perf_counter()
        loss_sum, count = loss_fn(model, batch)
        loss = loss_sum / count
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))  # the sync also ends the step's timing
        step_s.append(time.perf_counter() - start)
    finite = all(torch.isfinite(torch.tensor(losses)).tolist())
    return dict(
        model="lora_tiny_llama" if args.tiny else "lora_llama3_2_1b",
        quantize_base=quantize_base,
        compile=not args.no_compile,
        activation_checkpointing=True,
        trainable_params=sum(p.numel() for p in params),
        bs=args.bs,
        seq=seq,
        losses=[round(x, 4) for x in losses],
        first_step_s=round(step_s[0], 2),
        step_s_after_first=round(sum(step_s[1:]) / max(len(step_s) - 1, 1), 4),
        peak_memory_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None,
        passed=finite and losses[-1] < losses[0],
    )


def check_generation(args, device: str) -> dict:
    """(d): greedy decoding at batch 1, 128-token prompt, KV cache; eager and compiled decode step."""
    torch.manual_seed(0)
    with default_dtype(torch.bfloat16), torch.device("meta"):
        model = M.tiny_llama(vocab_size=512) if args.tiny else M.llama3_2_1b()
    model.to_empty(device=device)
    M.init_weights(model)
    model.eval()
    prompt = torch.randint(0, 512, (128,)).tolist()
    new_tokens = 16 if args.tiny else 128
    result = {}
    for compile in (False, True):

        def timed(n: int, compile: bool = compile) -> float:
            """Best of two timed runs after an untimed warm-up (and compilation) of the same shapes."""
            M.generate(model, [prompt], n, compile=compile)
            times = []
            for _ in range(2):
                if device == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                M.generate(model, [prompt], n, compile=compile)
                if device == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
            return min(times)

        prefill_s, total_s = timed(1), timed(new_tokens)
        result["compiled" if compile else "eager"] = dict(
            decode_tokens_per_s=round((new_tokens - 1) / (total_s - prefill_s), 1),
            prefill_s=round(prefill_s, 4),
        )
    result["model"] = "tiny_llama" if args.tiny else "llama3_2_1b (random init, bf16)"
    return result


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, help="JSON file for the results")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes (CPU smoke test)")
    parser.add_argument("--no-compile", action="store_true", help="train without torch.compile")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--bs", type=int, default=2)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument(
        "--skip", nargs="*", default=[], help="parts to skip: peft merged lora qlora generate"
    )
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but no CUDA GPU is visible; use --device cpu --tiny for a smoke test")
    out = Path(args.out)
    results = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "torch": torch.__version__,
    }
    parts = {
        "peft": lambda: check_peft(args, args.device),
        "merged": lambda: check_merged_export(args, args.device),
        "lora": lambda: check_training(args, args.device, quantize_base=False),
        "qlora": lambda: check_training(args, args.device, quantize_base=True),
        "generate": lambda: check_generation(args, args.device),
    }
    for name, run in parts.items():
        if name in args.skip:
            continue
        start = time.perf_counter()
        try:
            results[name] = run()
        except Exception as error:  # one failing part must not hide the others' numbers
            results[name] = {
                "passed": False,
                "error": repr(error),
                "traceback": traceback.format_exc()[-3000:],
            }
        results[name]["seconds"] = round(time.perf_counter() - start, 1)
        if args.device == "cuda":
            torch.cuda.empty_cache()
        out.write_text(json.dumps(results, indent=2))
        print(name, json.dumps({k: v for k, v in results[name].items() if k != "traceback"}), flush=True)
    failed = [name for name, row in results.items() if isinstance(row, dict) and row.get("passed") is False]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
