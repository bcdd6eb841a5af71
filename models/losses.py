"""Losses. Each docstring states its inputs (shapes, what the rows mean) and the formula."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


class GradeTokenCrossEntropy(torch.nn.Module):
    """Cross-entropy over the grade tokens at the answer position (the judge's fine-tuning loss).

    Inputs:
        logits: (b, V) next-token logits at the answer position (the last position of each prompt), or
            (b, G) logits already restricted to the grade tokens.
        targets: (b,) int64, the index of each pair's human grade in ``grades`` (0..G-1).

    Loss: mean over the batch of ``-log softmax(logits[:, grade_ids])[target]``. The softmax runs over the
    G grade tokens only, exactly the distribution the scorer reads, so probability mass on other tokens is
    neither rewarded nor penalised. ``label_smoothing`` spreads that much target mass evenly over the grades.
    """

    def __init__(self, grade_ids: Sequence[int], label_smoothing: float = 0.0):
        super().__init__()
        self.register_buffer("grade_ids", torch.tensor(list(grade_ids), dtype=torch.long), persistent=False)
        self.label_smoothing = label_smoothing

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if logits.shape[-1] != len(self.grade_ids):
            logits = logits.index_select(-1, self.grade_ids.to(logits.device))
        return F.cross_entropy(logits.float(), targets, label_smoothing=self.label_smoothing)
