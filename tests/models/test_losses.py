import math
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from models.losses import (
    GradeTokenCrossEntropy,
    InfoNCELoss,
    JointLHLoss,
    Rand1LHLoss,
    SumMargLHLoss,
)


def test_loss_over_grade_tokens_equals_manual_log_softmax():
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    grade_ids = [7, 3, 11, 20]
    targets = torch.tensor([0, 3, 1])
    loss = GradeTokenCrossEntropy(grade_ids)(logits, targets)
    restricted = logits[:, grade_ids]
    manual = -torch.log_softmax(restricted, -1)[torch.arange(3), targets].mean()
    assert torch.allclose(loss, manual)
    # given already-restricted logits, the same loss
    assert torch.allclose(GradeTokenCrossEntropy(grade_ids)(restricted, targets), manual)


def test_mass_on_other_tokens_is_ignored_and_gradient_flows():
    logits = torch.zeros(1, 10, requires_grad=True)
    loss = GradeTokenCrossEntropy([0, 1, 2, 3])(logits, torch.tensor([2]))
    assert torch.isclose(loss, torch.log(torch.tensor(4.0)))
    loss.backward()
    assert logits.grad[0, 4:].abs().sum() == 0 and logits.grad[0, 2] < 0


def test_label_smoothing_raises_loss_of_a_confident_correct_prediction():
    logits = torch.tensor([[10.0, 0.0, 0.0, 0.0]])
    plain = GradeTokenCrossEntropy(range(4))(logits, torch.tensor([0]))
    smooth = GradeTokenCrossEntropy(range(4), label_smoothing=0.1)(logits, torch.tensor([0]))
    assert smooth > plain


# The hand example (B=2 queries, G=2 passages per group, D=2):
#   q0 = (1, 0), q1 = (0, 1); group 0: p0 = (2, 0), p1 = (1, 1); group 1: p2 = (0, 1), p3 = (0, 0).
#   Dot products: q0 -> [2, 1, 0, 0], q1 -> [0, 1, 1, 0] (p2, p3 are q0's in-batch negatives, p0, p1 q1's).
#   Z0 = e^2 + e + 1 + 1 = 12.10734 (ln 2.49381), Z1 = 1 + e + e + 1 = 7.43656 (ln 2.00641).
#   Positives: q0 -> p0 and p1 (or p0 alone for InfoNCE), q1 -> p2.
#   log P(p0|q0) = 2 - 2.49381 = -0.49381, log P(p1|q0) = 1 - 2.49381 = -1.49381,
#   log P(p2|q1) = 1 - 2.00641 = -1.00641.
Q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
P = torch.tensor([[2.0, 0.0], [1.0, 1.0], [0.0, 1.0], [0.0, 0.0]])
TWO_POSITIVES = torch.tensor([[True, True], [True, False]])
ONE_POSITIVE = torch.tensor([[True, False], [True, False]])


def test_infonce_by_hand():
    # (0.49381 + 1.00641) / 2
    assert InfoNCELoss()(Q, P, ONE_POSITIVE).item() == pytest.approx(0.750110, abs=1e-5)


def test_joint_lh_by_hand():
    # q0: 0.49381 + 1.49381 = 1.98762; q1: 1.00641; mean 1.49702
    assert JointLHLoss()(Q, P, TWO_POSITIVES).item() == pytest.approx(1.497016, abs=1e-5)


def test_sum_marg_lh_by_hand():
    # q0: -ln((e^2 + e) / Z0) = -ln(10.10734 / 12.10734) = 0.18055; q1: 1.00641; mean 0.59348
    assert SumMargLHLoss()(Q, P, TWO_POSITIVES).item() == pytest.approx(0.593479, abs=1e-5)


def test_rand1_lh_by_hand_removes_the_undrawn_positive_from_the_softmax():
    # q0 drawn p0: p1 leaves the softmax: ln(e^2 + 1 + 1) - 2 = 0.23993; drawn p1: ln(e + 2) - 1 = 0.55144
    # q1 (one positive): 1.00641.  Means: 0.62298 (p0 drawn), 0.77893 (p1 drawn)
    expected = {0: 0.622977, 1: 0.778927}
    seen = set()
    for epoch in range(12):
        drawn = Rand1LHLoss(seed=3)
        drawn.set_epoch(epoch)
        first = int(drawn.draw(TWO_POSITIVES)[0].nonzero())
        loss_fn = Rand1LHLoss(seed=3)
        loss_fn.set_epoch(epoch)
        p = P.clone().requires_grad_()
        loss = loss_fn(Q, p, TWO_POSITIVES)
        assert loss.item() == pytest.approx(expected[first], abs=1e-5)
        loss.backward()
        undrawn = 1 - first
        # the undrawn positive is in no softmax of q0 and is only an in-batch negative of q1
        q1_only = torch.softmax(Q[1] @ P.T, 0)[undrawn] * Q[1] / 2
        assert torch.allclose(p.grad[undrawn], q1_only, atol=1e-6)
        seen.add(first)
    assert seen == {0, 1}, "twelve epochs should draw each of q0's two positives at least once"


def test_rand1_lh_draws_repeat_for_the_same_seed_and_epoch_and_change_across_epochs():
    mask = torch.ones(64, 4, dtype=torch.bool)

    def draws(seed, epoch, batches=2):
        loss_fn = Rand1LHLoss(seed=seed)
        loss_fn.set_epoch(epoch)
        return [loss_fn.draw(mask) for _ in range(batches)]

    first, again = draws(0, 1), draws(0, 1)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[0], draws(0, 2)[0])
    assert not torch.equal(first[0], draws(1, 1)[0])
    assert all((d.sum(dim=1) == 1).all() and not (d & ~mask).any() for d in first)
    # only positives are drawn
    sparse = torch.zeros(3, 4, dtype=torch.bool)
    sparse[0, 2] = sparse[1, 0] = sparse[1, 3] = sparse[2, 1] = True
    for _ in range(5):
        assert not (Rand1LHLoss().draw(sparse) & ~sparse).any()


def test_multi_positive_losses_equal_infonce_with_one_positive_each():
    torch.manual_seed(0)
    q, p = torch.randn(4, 8), torch.randn(4 * 5, 8)
    mask = torch.zeros(4, 5, dtype=torch.bool)
    mask[torch.arange(4), torch.tensor([0, 3, 1, 4])] = True
    infonce = InfoNCELoss(temperature=0.5)(q, p, mask)
    for loss_fn in (JointLHLoss(0.5), SumMargLHLoss(0.5), Rand1LHLoss(0.5, seed=7)):
        assert torch.allclose(loss_fn(q, p, mask), infonce, atol=1e-6), type(loss_fn).__name__


def test_temperature_divides_the_scores():
    # t = 2: q0 -> [1, .5, 0, 0]: ln(e + e^.5 + 2) - 1 = 0.85113; q1 -> [0, .5, .5, 0]: ln(2 + 2 e^.5) - .5 = 1.16722
    assert InfoNCELoss(temperature=2.0)(Q, P, ONE_POSITIVE).item() == pytest.approx(1.009176, abs=1e-5)
    torch.manual_seed(1)
    q, p = torch.randn(3, 4), torch.randn(6, 4)
    mask = torch.tensor([[True, True], [False, True], [True, False]])
    for cls in (JointLHLoss, SumMargLHLoss):
        assert torch.allclose(cls(temperature=0.05)(q, p, mask), cls()(q / 0.05, p, mask), atol=1e-4)
    with pytest.raises(ValueError, match="temperature"):
        SumMargLHLoss(temperature=0.0)


def test_sum_marg_lh_is_stable_where_summing_probabilities_underflows():
    q = torch.tensor([[100.0]])
    p = torch.tensor([[-10.0], [-11.0], [10.0]])  # both positives score 1000+ below the negative
    loss = SumMargLHLoss()(q, p, torch.tensor([[True, True, False]]))
    assert torch.isfinite(loss)
    assert loss.item() == pytest.approx(2000 - math.log1p(math.exp(-100)), rel=1e-6)


def test_bad_masks_and_shapes_name_the_rows():
    with pytest.raises(ValueError, match=r"rows \[1\] of positive_mask have no positive"):
        SumMargLHLoss()(Q, P, torch.tensor([[True, False], [False, False]]))
    with pytest.raises(ValueError, match=r"exactly one positive.*rows \[0\]"):
        InfoNCELoss()(Q, P, TWO_POSITIVES)
    with pytest.raises(ValueError, match="shapes disagree"):
        JointLHLoss()(Q, P[:3], TWO_POSITIVES)
    with pytest.raises(ValueError, match="bool"):
        JointLHLoss()(Q, P, TWO_POSITIVES.long())


# Two workers, B=2, G=3, D=4 each; the single-process reference sees the concatenated batch of 4 queries.
B, G, D = 2, 3, 4


def _batch():
    gen = torch.Generator().manual_seed(11)
    q, p = torch.randn(2 * B, D, generator=gen), torch.randn(2 * B * G, D, generator=gen)
    multi = torch.tensor([[True, True, False], [False, True, False], [True, False, True], [True, True, True]])
    single = torch.zeros(2 * B, G, dtype=torch.bool)
    single[torch.arange(2 * B), torch.tensor([0, 1, 2, 0])] = True
    return q, p, {"InfoNCELoss": single, "JointLHLoss": multi, "SumMargLHLoss": multi}


LOSSES = {"InfoNCELoss": InfoNCELoss, "JointLHLoss": JointLHLoss, "SumMargLHLoss": SumMargLHLoss}


def _worker(rank: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2, timeout=timedelta(seconds=60))
    try:
        q_all, p_all, masks = _batch()
        q = q_all[rank * B : (rank + 1) * B].clone().requires_grad_()
        p = p_all[rank * B * G : (rank + 1) * B * G].clone().requires_grad_()
        result = {}
        for name, cls in LOSSES.items():
            q.grad = p.grad = None
            loss = cls(temperature=0.5)(q, p, masks[name][rank * B : (rank + 1) * B])
            loss.backward()
            result[name] = (loss.detach(), q.grad.clone(), p.grad.clone())
        # bad input on one worker only: both raise (neither is left waiting in the gather)
        errors = []
        wrong = masks["JointLHLoss"][rank * B : (rank + 1) * B].clone()
        if rank == 1:
            wrong[0] = False
        try:
            JointLHLoss()(q, p, wrong)
        except ValueError as e:
            errors.append(str(e))
        # a worker with a different group size: both raise, naming the shapes
        g = G if rank == 0 else G - 1
        try:
            SumMargLHLoss()(q, p[: B * g], masks["SumMargLHLoss"][rank * B : (rank + 1) * B, :g])
        except ValueError as e:
            errors.append(str(e))
        result["errors"] = errors
        torch.save(result, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_gathered_workers_equal_one_process_on_the_concatenated_batch(tmp_path):
    mp.spawn(_worker, args=(f"file://{tmp_path}/rendezvous", str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    q_all, p_all, masks = _batch()
    for name, cls in LOSSES.items():
        q, p = q_all.clone().requires_grad_(), p_all.clone().requires_grad_()
        single = cls(temperature=0.5)(q, p, masks[name])
        single.backward()
        losses = [r[name][0] for r in ranks]
        assert torch.allclose((losses[0] + losses[1]) / 2, single, atol=1e-6), name
        assert not torch.allclose(losses[0], losses[1]), "the two workers should see different queries"
        # DDP averages the workers' gradients: the mean over 2 workers of the loss's gradient
        assert torch.allclose(torch.cat([r[name][2] for r in ranks]) / 2, p.grad, atol=1e-6), name
        assert torch.allclose(torch.cat([r[name][1] for r in ranks]) / 2, q.grad, atol=1e-6), name
    assert "rank 1" in ranks[1]["errors"][0] and "no positive" in ranks[1]["errors"][0]
    assert "rank(s) [1]" in ranks[0]["errors"][0]
    for r in ranks:
        assert "disagree on (B, G, D): [(2, 3, 4), (2, 2, 4)]" in r["errors"][1]


def test_scores_stay_float32_under_bf16_autocast():
    torch.manual_seed(2)
    q, p = torch.randn(8, 64), torch.randn(8 * 4, 64)
    mask = torch.rand(8, 4) < 0.5
    mask[:, 0] = True
    expected = SumMargLHLoss()(q.double(), p.double(), mask).item()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = SumMargLHLoss()(q, p, mask)
    # bf16 dot products of these 64-d vectors give 12.2707 instead of 12.2493
    assert loss.item() == pytest.approx(expected, abs=1e-4)


@pytest.mark.gpu
def test_losses_on_gpu_under_bf16_autocast_score_in_float32():
    torch.manual_seed(2)
    q, p = torch.randn(8, 64), torch.randn(8 * 4, 64)
    mask = torch.rand(8, 4) < 0.5
    mask[:, 0] = True
    expected = SumMargLHLoss()(q.double(), p.double(), mask)
    q_gpu, p_gpu = q.cuda().requires_grad_(), p.cuda().requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = SumMargLHLoss()(q_gpu, p_gpu, mask.cuda())
    # bf16 dot products of 64-d vectors would be off by about 1e-1
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(expected.item(), abs=1e-4)
    loss.backward()
    assert torch.isfinite(p_gpu.grad).all()
