"""CPU smoke test of scripts/bench_load.py: a random HF checkpoint is written and loaded into QLoRA."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_load.py"


@pytest.mark.parametrize("mode", ["qlora", "lora"])
def test_bench_load_reports_a_quantized_resident_size(tmp_path, mode):
    command = [sys.executable, str(SCRIPT), "--model", "tiny", "--mode", mode, "--dir", str(tmp_path / "ck")]
    result = subprocess.run([*command, "--device", "cpu"], capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    load = json.loads(next(line for line in result.stdout.splitlines() if line.startswith("LOAD "))[5:])
    index = json.loads((tmp_path / "ck" / "model.safetensors.index.json").read_text())
    checkpoint_bytes = index["metadata"]["total_size"]  # the bf16 weights written
    assert load["gpu_peak_alloc_gib"] is None and load["load_s"] > 0
    assert load["host_anon_peak_gib"] >= load["host_anon_before_gib"] > 0
    if mode == "qlora":  # NF4 projections (~4.1 bits) + bf16 embeddings/norms: well under the bf16 size
        assert load["model_resident_bytes"] < 0.75 * checkpoint_bytes
    else:  # the bf16 base as written, plus the adapters
        assert load["model_resident_bytes"] > checkpoint_bytes
