import json

import numpy as np
import pyarrow as pa
import pytest

from models.judge import LabelTokenScorer
from models.judge_card import JudgeCard, load_judge
from models.judge_ensemble import EnsembleScorer
from pipelines.calibrate_judge import StackSettings
from pipelines.errors import ConfigError
from pipelines.finetune_judge import FinetuneConfig, class_balanced_sample, finetune, sample_train_val
from pipelines.stage import load_config


def _table(labels):
    n = len(labels)
    return pa.table({"qid": [f"q{i % 7}" for i in range(n)], "label": pa.array(labels, pa.int8())})


def test_class_balance_even_when_possible_and_filled_when_a_grade_is_short():
    t = _table([0] * 50 + [1] * 30 + [2] * 20 + [3] * 5)
    s = class_balanced_sample(t, 40, [0, 1, 2, 3], seed=1)
    counts = np.bincount(s.column("label").to_numpy(), minlength=4)
    assert (
        s.num_rows == 40
        and counts[3] == 5
        and counts[:3].min() >= 11
        and counts.max() - counts[:3].min() <= 1
    )
    even = np.bincount(class_balanced_sample(t, 20, [0, 1, 2, 3], seed=1).column("label").to_numpy())
    assert even.tolist() == [5, 5, 5, 5]
    again = class_balanced_sample(t, 40, [0, 1, 2, 3], seed=1)
    assert again.equals(s)  # deterministic for the seed
    assert class_balanced_sample(t, 1000, [0, 1, 2, 3], seed=1).num_rows == t.num_rows


def test_train_and_val_never_share_a_query(synth_dataset):
    cfg = FinetuneConfig(train=[str(synth_dataset / "pairs")], out="unused", n_train=100, n_val=40)
    train, val, summary = sample_train_val(cfg)
    assert not set(train.column("qid").to_pylist()) & set(val.column("qid").to_pylist())
    assert summary["train_pairs"] == 100 and summary["val_pairs"] == 40
    assert set(summary["train_grades"].values()) == {25}


def test_config_names_bad_lora_key():
    with pytest.raises(ConfigError, match=r"lora\.rank"):
        load_config(FinetuneConfig, None, ["lora.rank=8"], train=["x"], out="o")


@pytest.mark.parametrize("zero", ["zero2", "zero3_offload"])
def test_two_step_finetune_on_ray_train_with_deepspeed_and_reload(
    zero, ray_session, tiny_causal_lm, synth_dataset, tmp_path
):
    """2 Ray Train workers, DeepSpeed (ZeRO-2, or ZeRO-3 with CPU offload) on gloo, LoRA; the saved adapter
    reloads and predicts identically."""
    out = tmp_path / "judge"
    cfg = FinetuneConfig(base_model=str(tiny_causal_lm), train=[str(synth_dataset / "pairs")], out=str(out),
                         n_train=16, n_val=8, batch_size=4, max_steps=2, eval_every=1, num_workers=2,
                         dtype="fp32", lr=1e-2, resume=False, deepspeed=zero,
                         stack=StackSettings(n_pairs=40, batch_size=8) if zero == "zero2" else None)  # fmt: skip
    r = finetune(cfg)
    card = JudgeCard.load(out)
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    assert card.base_model == str(tiny_causal_lm) and card.prompt_version.startswith("umbrela-v1@")
    assert len(card.training["history"]) >= 1 and len(card.cutpoints) == 3
    assert r.counts == {"train_pairs": 16, "val_pairs": 8}
    # the merged adapter scores the validation pairs exactly as the training run did
    ckpt_dir = sorted(p for p in (out / "ray_train" / "finetune").glob("checkpoint_*") if p.is_dir())
    best_step = card.metrics["step"]
    val_scores = None
    for d in ckpt_dir:
        state = json.loads((d / "state.json").read_text())
        if state["step"] == best_step:
            val_scores = json.loads((d / "val_scores.json").read_text())
    assert val_scores is not None
    judge = load_judge(str(out), dtype="fp32", device="cpu")
    if zero == "zero2":  # stacked on the validation queries' pairs after training
        assert card.combiner == "combiner.json" and card.metrics["stack"]["pairs"] == 40
        assert isinstance(judge.scorer(batch_size=4), EnsembleScorer)
    else:
        assert card.combiner is None and isinstance(judge.scorer(batch_size=4), LabelTokenScorer)
    _, val, _ = sample_train_val(cfg)
    rows = {(q, h): None for q, h in zip(val_scores["qid"], val_scores["human"], strict=True)}
    assert len(rows) >= 1
    scores = judge.llm_scorer(batch_size=4).score(val.column("query").to_pylist(), val.column("text").to_pylist(),
                                              val.column("title").to_pylist(), val.column("url").to_pylist())  # fmt: skip
    np.testing.assert_allclose(sorted(scores.score), sorted(val_scores["score"]), atol=1e-4)
    # and the fine-tuned judge differs from the base model (the adapter did something)
    base = load_judge(str(tiny_causal_lm), dtype="fp32", device="cpu").scorer(batch_size=4)
    base_scores = base.score(val.column("query").to_pylist(), val.column("text").to_pylist(),
                             val.column("title").to_pylist(), val.column("url").to_pylist())  # fmt: skip
    assert np.abs(base_scores.score - scores.score).max() > 1e-4
