"""NaN/Inf guard, OOM advice, early stopping, progress bar."""

from __future__ import annotations

import io
import math

import pytest
import torch

from ftcore.training import EarlyStopping, NonFiniteLossError, ProgressBar, check_finite, explain_oom


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_check_finite_names_the_step(bad):
    check_finite(torch.tensor(2.5), step=3)
    with pytest.raises(NonFiniteLossError, match=r"at step 17"):
        check_finite(torch.tensor(bad), step=17)


def test_explain_oom_names_memory_settings():
    with pytest.raises(torch.OutOfMemoryError) as caught, explain_oom({"batch_size": 8}):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    message = str(caught.value)
    for setting in ("batch_size (now 8)", "gradient_accumulation_steps", "enable_activation_checkpointing",
                    "max_seq_len", "quantize_base", "adamw_8bit", "Tried to allocate 2.00 GiB"):  # fmt: skip
        assert setting in message
    with pytest.raises(ValueError), explain_oom():  # other errors pass through untouched
        raise ValueError("x")


def test_early_stopping_patience_and_best():
    stopper = EarlyStopping(patience=2, min_delta=0.01)
    history = [(1.0, 10), (0.8, 20), (0.795, 30), (0.9, 40)]
    improved = [stopper.update(value, step) for value, step in history]
    assert improved == [True, True, False, False]
    assert stopper.should_stop and stopper.best == 0.8 and stopper.best_step == 20
    restored = EarlyStopping(patience=2)
    restored.load_state_dict(stopper.state_dict())
    assert restored.should_stop and restored.best_step == 20
    with pytest.raises(ValueError):
        EarlyStopping(patience=0)


def test_progress_bar_shows_loss_lr_and_rate():
    stream = io.StringIO()
    bar = ProgressBar(total_steps=10, initial_step=2, file=stream)
    rate = bar.update(loss=1.2345, lr=3e-4, num_tokens=1000)
    bar.bar.refresh()
    text = stream.getvalue()
    bar.close()
    assert rate > 0 and bar.bar.n == 3
    assert "loss=1.2345" in text and "lr=3.00e-04" in text and "tok_s=" in text and "3/10" in text


def test_a_misspelt_device_names_the_config_key():
    from ftcore.runner.setup import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match=r"config key `device` is 'cpuu'; use cpu, cuda, cuda:N or auto"):
        resolve_device("cpuu")


def test_a_missing_relative_path_says_where_it_was_resolved_from(tmp_path, monkeypatch):
    from ftcore.data.tokenizers.base import existing_file

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=rf"tok.model \(relative to the current directory {tmp_path}\)"):
        existing_file("tok.model", "SentencePiece model")
    with pytest.raises(ValueError, match=r"not found: /abs/tok.model \(check"):
        existing_file("/abs/tok.model", "SentencePiece model")
