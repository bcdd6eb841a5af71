import torch

from models.losses import GradeTokenCrossEntropy


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
