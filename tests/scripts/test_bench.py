"""CPU smoke tests of scripts/bench.py (tiny model) and checks of its FLOP count and table."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import time
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode, flop_registry

BENCH_PATH = Path(__file__).resolve().parents[2] / "scripts" / "bench.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("ftcore_bench", BENCH_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _adapter_param_count(sizes: dict, rank: int) -> int:
    """rank * (in + out) for q, k, v, output_proj and w1, w2, w3 of every layer, from the sizes alone."""
    dim, hidden = sizes["dim"], sizes["hidden_dim"]
    head_dim = dim // sizes["n_heads"]
    kv_dim = sizes["n_kv_heads"] * head_dim
    per_layer = (dim + dim) + 2 * (dim + kv_dim) + (dim + dim) + 3 * (dim + hidden)
    return rank * per_layer * sizes["n_layers"]


@pytest.mark.parametrize("mode", ["full", "lora", "qlora"])
def test_tiny_training_run_writes_a_result(bench, tmp_path, mode):
    out = tmp_path / "result.json"
    argv = ["--model", "tiny", "--device", "cpu", "--mode", mode, "--bs", "2", "--seq", "32"]
    assert bench.main([*argv, "--warm", "1", "--steps", "2", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["tokens_per_s"] > 0 and result["step_s"] > 0 and len(result["step_times_s"]) == 2
    assert result["mode"] == mode and result["system"].startswith("ftcore")
    assert 0 < result["mfu"] and result["flops_per_step"] > 0
    # A random-init model predicts a near-uniform distribution: the loss is close to ln(vocab).
    assert abs(result["last_loss"] - math.log(bench.TINY_SIZES["vocab_size"])) < 0.5
    if mode != "full":
        assert result["trainable_params"] == _adapter_param_count(bench.TINY_SIZES, rank=8)


def test_optimizer_in_backward_trains_like_the_fused_adamw_step(bench, tmp_path, capsys):
    argv = ["--model", "tiny", "--device", "cpu", "--mode", "full", "--bs", "2", "--seq", "32", "--warm", "1"]
    losses = {}
    runs = {"ordinary": [], "in_backward": ["--optimizer-in-backward"], "lr0": ["--lr", "0"]}
    for name, extra in runs.items():
        out = tmp_path / f"{name}.json"
        assert bench.main([*argv, "--steps", "3", "--lr", "1e-2", "--out", str(out), *extra]) == 0
        result = json.loads(out.read_text())
        assert result["optimizer"] == "adamw" and result["optimizer_in_backward"] == (name == "in_backward")
        losses[name] = result["last_loss"]
    assert "in-backward:" in capsys.readouterr().out  # the summary line names the switch
    # Same tokens, same per-parameter AdamW updates: the 4th step's loss is the same (to its 4 digits),
    # and the steps did change it (an untrained model's loss differs by far more than that tolerance).
    assert losses["in_backward"] == pytest.approx(losses["ordinary"], abs=2e-4)
    assert abs(losses["lr0"] - losses["ordinary"]) > 0.01


def test_qlora_bases_get_random_nf4_weights(bench):
    from ftcore.modules.lora import LoRALinear

    model = bench.build_model("tiny", "qlora", rank=8, device=torch.device("cpu"))
    bases = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert len(bases) == 7 * bench.TINY_SIZES["n_layers"] and all(m.quantize_base for m in bases)
    weight = bases[0].base_weight().float()
    assert torch.isfinite(weight).all()
    assert 0.015 < weight.std().item() < 0.025  # normal(0, 0.02) survived the NF4 round trip


def _flop_counter_total(model, tokens) -> int:
    # torch's table has out-of-place addmm only; LoRA adds its products in place (addmm_), same FLOPs
    def addmm_in_place(*args, **kwargs):  # torch's addmm entry, which already takes tensors
        return flop_registry[torch.ops.aten.addmm](*args, **kwargs)

    addmm_in_place._get_raw = True  # tells FlopCounterMode not to wrap it a second time
    counter = FlopCounterMode(display=False, custom_mapping={torch.ops.aten.addmm_: addmm_in_place})
    with counter:
        model(tokens).sum().backward()
    return counter.get_total_flops()


def _attention_flops(sizes: dict, batch: int, seq: int) -> int:
    """Non-causal attention, forward + backward: 3 x (QK^T and AV: 2 * 2 * T * d_attn) per token per layer."""
    return 12 * seq * sizes["dim"] * sizes["n_layers"] * batch * seq


def test_full_flops_match_torch_flop_counter(bench):
    """torch's FlopCounterMode counts every matmul of forward + backward (it does not see CPU SDPA)."""
    torch.manual_seed(0)
    model = bench.build_model("tiny", "full", rank=8, device=torch.device("cpu")).float()
    batch, seq = 2, 16
    tokens = torch.randint(0, bench.TINY_SIZES["vocab_size"], (batch, seq))
    counted = _flop_counter_total(model, tokens)
    ours = bench.model_flops_per_step(model, batch, seq, causal=False)
    assert ours - _attention_flops(bench.TINY_SIZES, batch, seq) == counted


def test_lora_flops_match_torch_flop_counter(bench):
    """LoRA: adapters get weight gradients, frozen bases only input gradients. The one term our count
    includes and autograd skips: the first block's q/k/v input gradients (its input needs no grad)."""
    torch.manual_seed(0)
    model = bench.build_model("tiny", "lora", rank=8, device=torch.device("cpu")).float()
    batch, seq = 2, 16
    tokens = torch.randint(0, bench.TINY_SIZES["vocab_size"], (batch, seq))
    counted = _flop_counter_total(model, tokens)
    attn = model.layers[0].attn
    skipped = sum(p.in_dim * p.out_dim + p.rank * p.in_dim for p in (attn.q_proj, attn.k_proj, attn.v_proj))
    ours = bench.model_flops_per_step(model, batch, seq, causal=False)
    assert ours - _attention_flops(bench.TINY_SIZES, batch, seq) - 2 * skipped * batch * seq == counted


def test_causal_attention_counts_half_the_score_matmuls(bench):
    model = bench.build_model("tiny", "full", rank=8, device=torch.device("meta"))
    batch, seq = 1, 64
    full = bench.model_flops_per_step(model, batch, seq, causal=False)
    causal = bench.model_flops_per_step(model, batch, seq, causal=True)
    assert full - causal == _attention_flops(bench.TINY_SIZES, batch, seq) // 2


def test_generation_speed_on_cpu(bench, tmp_path):
    out = tmp_path / "gen.json"
    bench.main(
        ["--model", "tiny", "--device", "cpu", "--generate", "24", "--prompt-len", "4", "--out", str(out)]
    )
    result = json.loads(out.read_text())
    assert result["kind"] == "generate" and result["new_tokens"] == 24
    assert result["decode_tokens_per_s"] > 0 and result["prefill_tokens_per_s"] > 0


def _record(system, mode, compile_, tokens_per_s, gib, mfu=None):
    record = dict(system=system, model="llama3_1_8b", mode=mode, bs=2, seq=2048, ac=True, compile=compile_)
    return dict(record, tokens_per_s=tokens_per_s, peak_alloc_gib=gib, mfu=mfu)


def test_table_pairs_ftcore_with_the_peer(bench, tmp_path):
    records = [
        _record("torchtune-0.6.1", "lora", False, 7000.0, 20.0),
        _record("torchtune-0.6.1", "lora", True, 10000.0, 16.0),
        _record("ftcore-src", "lora", False, 15000.0, 12.0, mfu=0.5),
        _record("torchtune-0.6.1", "qlora", True, 9000.0, 8.0),
        {"kind": "generate", "system": "ftcore-src", "decode_tokens_per_s": 50.0},
    ]
    path = tmp_path / "results.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    rows = bench.render_table(path).splitlines()
    assert len(rows) == 2 + 2  # header, rule, the ftcore LoRA row, the unmatched peer QLoRA row
    lora = rows[2].split("|")
    assert "15,000" in lora[6] and "10,000" in lora[10]
    assert lora[12].strip() == "1.50x" and lora[13].strip() == "2.14x" and lora[14].strip() == "0.75x"
    assert "qlora" in rows[3] and "(not run)" in rows[3] and "9,000" in rows[3]


@pytest.mark.parametrize("flag", ["--bs", "--seq", "--steps"])
def test_non_positive_sizes_are_rejected(bench, flag):
    with pytest.raises(ValueError, match=flag):
        bench.parse_args([flag, "0"])


def test_bench_vs_peer_script_runs_ftcore_and_skips_what_does_not_fit(tmp_path):
    """The shell driver on CPU: one tiny ftcore run lands in the JSONL and the table; a peer run whose
    minimum time no longer fits before the deadline is recorded as skipped (and nothing is installed)."""
    script = BENCH_PATH.parent / "bench_vs_peer.sh"
    env = dict(
        os.environ,
        OUT=str(tmp_path),
        BENCH_DEADLINE=str(int(time.time()) + 3600),
        BENCH_EXTRA_ARGS="--device cpu --warm 1 --steps 2",
    )
    runs = ["ftcore:lora:eager:0:300", "peer:lora:compile:99999:300"]
    cmd = ["bash", str(script), "--model", "tiny", "--bs", "1", "--seq", "16", *runs]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    records = [json.loads(line) for line in (tmp_path / "bench_results.jsonl").read_text().splitlines()]
    assert len(records) == 2
    ours, peer = records
    assert ours["tokens_per_s"] > 0 and ours["ac"] is True and ours["wall_s"] >= 0
    assert peer["status"] == "skipped" and peer["run"].startswith("peer tiny lora")
    table = (tmp_path / "bench_table.md").read_text().splitlines()
    assert len(table) == 3 and "| tiny | lora | 1 x 16 | yes | no |" in table[2]
