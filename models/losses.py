"""Losses. Each docstring states its inputs (shapes, what the rows mean) and the formula."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch
import torch.distributed as dist
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


class ContrastiveLoss(torch.nn.Module):
    """Base of the dense-retrieval losses of paper 2 (../shared/papers.md, section 2).

    Inputs (every subclass):
        q: (B, D) query embeddings of this worker, one row per query.
        p: (B*G, D) passage embeddings of this worker, group-major: rows ``i*G .. i*G+G-1`` are query i's group
            (its positives and hard negatives, in any order).
        positive_mask: (B, G) bool; ``positive_mask[i, j]`` is True when passage ``i*G + j`` is a positive of
            query i. Every row needs at least one True (the data layer skips queries without a positive).

    Candidates of query i: its own group, every other query's group in the batch (in-batch negatives) and, when
    ``gather`` is on and torch.distributed is initialized with world size W > 1, every other worker's passages
    (cross-worker negatives). The passages are gathered with ``torch.distributed.nn.functional.all_gather``,
    whose backward sends each worker the summed gradient of every worker's loss for its own shard. Scores are
    ``s(q, d) = q . d / temperature`` over all W*B*G candidates, and

        P(d | q) = exp(s(q, d)) / sum over the candidates d' of exp(s(q, d')).

    Query i's positive columns sit in its own group, at ``rank*B*G + i*G + j``. Passages of other queries are
    negatives of query i even when they happen to be relevant to it (as in the paper). Every worker must pass
    the same B, G and D (the trainer drops the last incomplete batch); a mismatch raises ValueError. The loss is
    the mean over this worker's queries; DDP's gradient averaging makes the step that of the mean over all W*B
    queries. Scores are computed in float32 with autocast off: a softmax over a few thousand bf16 dot products
    loses the differences between the scores that matter.
    """

    def __init__(self, temperature: float = 1.0, gather: bool = True):
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)
        self.gather = gather

    def forward(self, q: torch.Tensor, p: torch.Tensor, positive_mask: torch.Tensor) -> torch.Tensor:
        problem = _input_problem(q, p, positive_mask) or self._mask_problem(positive_mask)
        if self._gathering():
            passages, offset = self._gather(p, positive_mask.shape, q.shape[-1] if q.ndim else -1, problem)
        elif problem:
            raise ValueError(f"{type(self).__name__}: {problem}")
        else:
            passages, offset = p, 0
        b, g = positive_mask.shape
        with torch.autocast(device_type=q.device.type, enabled=False):
            scores = (q.float() @ passages.float().T) / self.temperature
        columns = offset + torch.arange(b * g, device=q.device).view(b, g)
        return self._loss(scores, columns, positive_mask.to(q.device)).mean()

    def _mask_problem(self, positive_mask: torch.Tensor) -> str | None:
        empty = (~positive_mask.any(dim=1)).nonzero().flatten().tolist()
        return f"rows {empty} of positive_mask have no positive" if empty else None

    def _gathering(self) -> bool:
        return self.gather and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1

    def _gather(
        self, p: torch.Tensor, mask_shape: torch.Size, dim: int, problem: str | None
    ) -> tuple[torch.Tensor, int]:
        """Every worker's passages in rank order, and the column of this worker's first passage.

        The workers first exchange (B, G, D, ok): a worker that raised alone would leave the others waiting in
        the collective (forever on NCCL), and a shape mismatch would fail deep inside the backend. So every
        worker raises when any of them has bad input."""
        world, rank = dist.get_world_size(), dist.get_rank()
        b, g = (mask_shape[0], mask_shape[1]) if len(mask_shape) == 2 else (-1, -1)
        mine = torch.tensor([b, g, dim, problem is None], dtype=torch.long, device=p.device)
        every = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(every, mine)
        every = [tuple(t.tolist()) for t in every]
        name = type(self).__name__
        if problem:
            raise ValueError(f"{name} (rank {rank}): {problem}")
        failed = [r for r, t in enumerate(every) if not t[3]]
        if failed:
            raise ValueError(f"{name}: bad input on rank(s) {failed} (see their error)")
        if len({t[:3] for t in every}) > 1:
            raise ValueError(
                f"{name}: workers disagree on (B, G, D): {[t[:3] for t in every]} by rank; every worker must "
                "pass the same batch size, group size and dimension (drop the last incomplete batch)"
            )
        import torch.distributed.nn.functional as dist_nn  # only where torch.distributed exists

        with warnings.catch_warnings():
            # deprecated in favour of _functional_collectives.all_gather_single, whose autograd support only
            # arrived after torch 2.4 (the oldest torch augrel accepts); this one has had it all along
            warnings.simplefilter("ignore", FutureWarning)
            shards = dist_nn.all_gather(p)
        return torch.cat(shards, dim=0), rank * b * g

    def _loss(self, scores: torch.Tensor, columns: torch.Tensor, positive_mask: torch.Tensor) -> torch.Tensor:
        """Per-query losses (B,) from the scores (B, N), the columns (B, G) of each query's group among the N
        candidates, and positive_mask (B, G)."""
        raise NotImplementedError


def _spread(mask: torch.Tensor, columns: torch.Tensor, n: int) -> torch.Tensor:
    """A (B, G) mask over the groups as a (B, N) mask over all candidates."""
    return torch.zeros((mask.shape[0], n), dtype=torch.bool, device=mask.device).scatter_(1, columns, mask)


class InfoNCELoss(ContrastiveLoss):
    """InfoNCE: ``L = -log P(d+ | q)`` with exactly one positive per query.

    Inputs: q (B, D), p (B*G, D) group-major, positive_mask (B, G) bool with exactly one True per row (any
    other count raises ValueError naming the rows); see ContrastiveLoss for the candidates and P(d | q).
    """

    def _mask_problem(self, positive_mask):
        counts = positive_mask.sum(dim=1)
        bad = (counts != 1).nonzero().flatten().tolist()
        if bad:
            return (
                f"exactly one positive per query is needed; rows {bad} of positive_mask have "
                f"{counts[bad].tolist()} (Rand1LH, JointLH and SumMargLH take several)"
            )
        return None

    def _loss(self, scores, columns, positive_mask):
        return torch.logsumexp(scores, dim=1) - scores.gather(1, columns)[positive_mask]


class Rand1LHLoss(ContrastiveLoss):
    """Rand1LH: per epoch, one positive drawn per query; the other positives leave the softmax; then InfoNCE.

    Inputs: q (B, D), p (B*G, D) group-major, positive_mask (B, G) bool, at least one True per row; see
    ContrastiveLoss for the candidates and P(d | q).

    The draw is uniform over the row's positives, from a ``torch.Generator`` seeded from (seed, epoch, rank)
    when ``set_epoch(epoch)`` is called (and at construction, for epoch 0); successive batches continue the
    same stream, so the same batches in the same order draw the same positives. The positives not drawn are
    removed from the candidates of their own query (neither positive nor negative: they are relevant, so
    counting them as negatives would push the query away from them). ``draw(positive_mask)`` returns the
    drawn mask.
    """

    def __init__(self, temperature: float = 1.0, gather: bool = True, seed: int = 0):
        super().__init__(temperature, gather)
        self.seed = seed
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        # made at the first draw: the rank is only known once the process group exists
        self._generator: torch.Generator | None = None

    def draw(self, positive_mask: torch.Tensor) -> torch.Tensor:
        """One positive per row of ``positive_mask`` (B, G), uniform among the row's Trues: (B, G) bool."""
        weights = positive_mask.detach().to("cpu", torch.float32)
        empty = (weights.sum(dim=1) == 0).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"Rand1LHLoss: rows {empty} of positive_mask have no positive")
        if self._generator is None:
            rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
            state = np.random.SeedSequence([self.seed, self.epoch, rank]).generate_state(2, dtype=np.uint32)
            self._generator = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
        chosen = torch.multinomial(weights, 1, generator=self._generator).flatten()
        drawn = torch.zeros_like(positive_mask, dtype=torch.bool)
        drawn[torch.arange(len(chosen)), chosen.to(positive_mask.device)] = True
        return drawn

    def _loss(self, scores, columns, positive_mask):
        drawn = self.draw(positive_mask)
        undrawn = _spread(positive_mask & ~drawn, columns, scores.shape[1])
        scores = scores.masked_fill(undrawn, float("-inf"))
        return torch.logsumexp(scores, dim=1) - scores.gather(1, columns)[drawn]


class JointLHLoss(ContrastiveLoss):
    """JointLH: ``L = -sum over d+ in D+ of log P(d+ | q)``: summed over a query's positives, mean over queries.

    Inputs: q (B, D), p (B*G, D) group-major, positive_mask (B, G) bool, at least one True per row; see
    ContrastiveLoss for the candidates and P(d | q). Every positive stays in the softmax of every other one.
    """

    def _loss(self, scores, columns, positive_mask):
        log_p = scores - torch.logsumexp(scores, dim=1, keepdim=True)
        return -(log_p.gather(1, columns) * positive_mask).sum(dim=1)


class SumMargLHLoss(ContrastiveLoss):
    """SumMargLH (paper 2's loss): ``L = -log sum over d+ in D+ of P(d+ | q)``, mean over queries.

    Inputs: q (B, D), p (B*G, D) group-major, positive_mask (B, G) bool, at least one True per row; see
    ContrastiveLoss for the candidates and P(d | q). Computed as a masked logsumexp,
    ``-(logsumexp(s[positives]) - logsumexp(s[all]))``, the same value as summing the probabilities but stable.
    """

    def _loss(self, scores, columns, positive_mask):
        positive_scores = scores.gather(1, columns).masked_fill(~positive_mask, float("-inf"))
        return torch.logsumexp(scores, dim=1) - torch.logsumexp(positive_scores, dim=1)


def _input_problem(q: torch.Tensor, p: torch.Tensor, positive_mask: torch.Tensor) -> str | None:
    if q.ndim != 2 or p.ndim != 2 or positive_mask.ndim != 2:
        return (
            f"expected q (B, D), p (B*G, D) and positive_mask (B, G); got q {tuple(q.shape)}, "
            f"p {tuple(p.shape)}, positive_mask {tuple(positive_mask.shape)}"
        )
    if positive_mask.dtype != torch.bool:
        return f"positive_mask must be a bool tensor, got {positive_mask.dtype}"
    b, g = positive_mask.shape
    if b == 0 or g == 0:
        return f"empty batch: positive_mask {tuple(positive_mask.shape)}"
    if q.shape[0] != b or p.shape[0] != b * g or p.shape[1] != q.shape[1]:
        return (
            f"shapes disagree: q {tuple(q.shape)} should be (B, D), p {tuple(p.shape)} (B*G, D) and "
            f"positive_mask {tuple(positive_mask.shape)} (B, G)"
        )
    return None
