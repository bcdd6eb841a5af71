import numpy as np
import pytest

from models.cross_encoder import CrossEncoderGrader


@pytest.mark.slow
def test_minilm_cross_encoder_learns_a_separable_toy_task():
    q = np.array(["what river flows through the town"] * 16, dtype=object)
    t = np.array(["the river flows through the town"] * 8 + ["bananas are yellow fruit"] * 8, dtype=object)
    y = np.array([3] * 8 + [0] * 8)
    ce = CrossEncoderGrader.from_pretrained()
    losses = ce.fit(q, t, y, epochs=4, batch_size=8, lr=1e-4)
    _, probs, score = ce.predict(q, t)
    assert losses[-1] < losses[0]
    np.testing.assert_allclose(probs.sum(1), 1, atol=1e-5)
    assert score[:8].mean() > score[8:].mean()
    label, probs, score = ce.predict(q[:0], t[:0])
    assert label.shape == (0,) and probs.shape == (0, 4) and score.shape == (0,)
    with pytest.raises(ValueError, match="no training pairs"):
        ce.fit(q[:0], t[:0], y[:0])
    with pytest.raises(ValueError, match=r"labels \[7\] are not among grades"):
        ce.fit(q[:2], t[:2], np.array([7, 0]))
