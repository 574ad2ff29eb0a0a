"""The demo task: reverse a short word. The answer is checkable, so accuracy can be measured exactly."""

from __future__ import annotations

import json
import random
import string
from collections import defaultdict
from pathlib import Path

import torch

from ftcore.demo.tokenizer import CharTokenizer
from ftcore.modules.host_embedding import compute_device


def make_reversal_dataset(path: str, num_rows: int, seed: int, min_len: int = 3, max_len: int = 6) -> str:
    """Write `num_rows` chat rows `{"messages": [user: "abc=", assistant: "cba"]}` as JSONL; return the path.

    Generated, not shipped, so the demo needs no files outside the project. The same seed gives the
    same file; different seeds give (almost surely) disjoint words for train and validation.
    """
    rng = random.Random(seed)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as f:
        for _ in range(num_rows):
            word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(min_len, max_len)))
            row = {
                "messages": [
                    {"role": "user", "content": f"{word}="},
                    {"role": "assistant", "content": word[::-1]},
                ]
            }
            f.write(json.dumps(row) + "\n")
    return str(out)


class ExactMatchEvaluator:
    """Greedy-decode each held-out prompt and count answers equal to the reference, character for character."""

    def __init__(self, path: str, max_rows: int = 200, max_new_tokens: int = 12):
        self.path, self.max_rows, self.max_new_tokens = path, max_rows, max_new_tokens

    def _rows(self) -> list[tuple[str, str]]:
        with open(self.path) as f:
            rows = [json.loads(line)["messages"] for line in f if line.strip()]
        return [(m[0]["content"], m[1]["content"]) for m in rows[: self.max_rows]]

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module, tokenizer: CharTokenizer) -> dict[str, float]:
        device = compute_device(model)  # not the token table's, which offload_embedding keeps on the host
        by_length: dict[int, list[tuple[list[int], str]]] = defaultdict(list)
        for prompt, answer in self._rows():
            ids = tokenizer.encode(prompt, add_bos=True, add_eos=False)
            by_length[len(ids)].append((ids, answer))
        correct = total = 0
        was_training = model.training
        model.eval()
        for group in by_length.values():
            # Prompts of one length batch without padding: (B, T) grows by one greedy token a step.
            tokens = torch.tensor([ids for ids, _ in group], device=device)
            for _ in range(self.max_new_tokens):
                next_ids = model(tokens)[:, -1].argmax(-1, keepdim=True)  # (B, 1)
                tokens = torch.cat([tokens, next_ids], dim=1)
            for row, (ids, answer) in zip(tokens.tolist(), group):
                generated = row[len(ids) :]
                if tokenizer.eos_id in generated:
                    generated = generated[: generated.index(tokenizer.eos_id)]
                correct += tokenizer.decode(generated) == answer
                total += 1
        model.train(was_training)
        return {"exact_match": correct / max(total, 1)}
