"""Packing and collate: shapes, padding, the block-causal mask, and packed loss == unpacked loss."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from ftcore.data import chat_dataset, packed_collate, padded_collate, preference_collate
from ftcore.data.packing import pack_samples
from ftcore.models.builders import tiny_llama


def sample(tokens: list[int], trained_from: int) -> dict[str, list[int]]:
    return {"tokens": tokens, "labels": [-100] * trained_from + tokens[trained_from:]}


def test_padded_collate_right_pads_to_longest_or_fixed():
    batch = [sample([5, 6, 7], 1), sample([8], 0)]
    out = padded_collate(batch, pad_id=0)
    assert out["tokens"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert out["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert padded_collate(batch, pad_id=9, pad_to=5)["tokens"].tolist() == [[5, 6, 7, 9, 9], [8, 9, 9, 9, 9]]
    with pytest.raises(ValueError, match="longer than pad_to=2"):
        padded_collate(batch, pad_id=0, pad_to=2)


def test_preference_collate_stacks_chosen_then_rejected():
    batch = [
        {
            "chosen_tokens": [1, 2],
            "chosen_labels": [-100, 2],
            "rejected_tokens": [1, 3, 4],
            "rejected_labels": [-100, 3, 4],
        }
    ]
    out = preference_collate(batch, pad_id=0)
    assert out["tokens"].tolist() == [[1, 2, 0], [1, 3, 4]]
    assert out["labels"].tolist() == [[-100, 2, -100], [-100, 3, 4]]


def test_pack_samples_greedy_positions_documents_and_padding():
    samples = [sample([1, 2, 3], 1), sample([4, 5], 0), sample([6, 7, 8, 9], 2), sample([10], 0)]
    packs = pack_samples(samples, max_seq_len=6, pad_id=0)
    assert [p["tokens"] for p in packs] == [[1, 2, 3, 4, 5, 0], [6, 7, 8, 9, 10, 0]]
    assert packs[0]["input_pos"] == [0, 1, 2, 0, 1, 0]
    assert packs[0]["document_ids"] == [0, 0, 0, 1, 1, 2]
    # Each document's first label is ignored: it would be predicted across the document boundary.
    assert packs[0]["labels"] == [-100, 2, 3, -100, 5, -100]
    assert packs[1]["labels"] == [-100, -100, 8, 9, -100, -100]


def test_packed_collate_mask_is_block_causal():
    pack = pack_samples([sample([1, 2], 0), sample([3, 4, 5], 0)], max_seq_len=6, pad_id=0)
    mask = packed_collate(pack)["mask"][0]
    expected = torch.tensor(
        [[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0],
         [0, 0, 1, 1, 0, 0], [0, 0, 1, 1, 1, 0], [0, 0, 0, 0, 0, 1]], dtype=torch.bool,
    )  # fmt: skip
    assert torch.equal(mask, expected)
    assert padded_collate(pack, pad_id=0)["mask"].shape == (1, 6, 6)


def summed_loss(model, batch: dict[str, torch.Tensor]) -> tuple[float, int]:
    logits = model(batch["tokens"], input_pos=batch.get("input_pos"), mask=batch.get("mask"))  # (B, T, V)
    labels = batch["labels"][:, 1:]  # the loss shifts: logits at t predict the token at t + 1
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
    return loss.item(), int((labels != -100).sum())


def test_packed_loss_equals_unpacked_loss(tmp_path, byte_tokenizer):
    torch.manual_seed(0)
    rows = [
        {"conversations": [{"from": "human", "value": "q" * (3 + i)}, {"from": "gpt", "value": f"answer {i}" * (1 + i % 3)}]}
        for i in range(9)
    ]  # fmt: skip
    (tmp_path / "c.json").write_text(json.dumps(rows))
    plain = chat_dataset(byte_tokenizer, str(tmp_path / "c.json"), max_seq_len=64)
    packed = chat_dataset(byte_tokenizer, str(tmp_path / "c.json"), max_seq_len=64, packed=True)
    assert len(packed) < len(plain) == 9 and all(len(p["tokens"]) == 64 for p in packed)
    model = tiny_llama(
        vocab_size=byte_tokenizer.vocab_size, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64
    )
    model.eval()
    with torch.no_grad():
        unpacked = [summed_loss(model, padded_collate([s], pad_id=0)) for s in plain]
        packed_batch = padded_collate(list(packed), pad_id=0)
        packed_loss, packed_count = summed_loss(model, packed_batch)
        no_mask = dict(packed_batch, mask=None, input_pos=None)  # what packing without a mask would give
        leaky_loss, _ = summed_loss(model, no_mask)
    assert packed_count == sum(count for _, count in unpacked)
    assert packed_loss == pytest.approx(sum(loss for loss, _ in unpacked), rel=1e-5)
    assert abs(leaky_loss - packed_loss) > 1e-3  # the test can tell a leaking mask apart
