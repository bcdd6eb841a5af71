import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from models.judge import LabelTokenScorer
from models.judge_card import JudgeCard, load_judge
from models.judge_ensemble import EnsembleScorer
from pipelines.calibrate_judge import StackSettings
from pipelines.errors import ConfigError
from pipelines.finetune_judge import (
    FinetuneConfig,
    class_balanced_sample,
    finetune,
    natural_sample,
    sample_train_val,
    split_pools,
)
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
    assert card.base_model == str(tiny_causal_lm) and card.prompt_version.startswith("umbrela-fenced-v1@")
    assert len(card.training["history"]) >= 1 and len(card.cutpoints) == 3
    # 16 human-labelled pairs, and an injected copy of a quarter of their 4 grade-0 pairs (label unchanged)
    assert r.counts == {"train_pairs": 16, "val_pairs": 8, "injected_pairs": 1}
    assert card.data["injected"]["pairs"] == 1 and card.injection_guard == "strip"
    # the merged adapter scores the validation pairs exactly as the training run did
    ckpt_dir = sorted(p for p in Path(card.training["ray_train_run"]).glob("checkpoint_*") if p.is_dir())
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
        assert isinstance(judge.scorer(batch_size=4, guard="off"), EnsembleScorer)
    else:
        assert card.combiner is None and isinstance(judge.scorer(batch_size=4, guard="off"), LabelTokenScorer)
    # the cut-points are tuned on validation-query pairs in their natural grade mix (the balanced validation
    # sample only ranked the checkpoints), by the judge as saved
    from eval.agreement import tune_cutpoints

    calib = natural_sample(split_pools(cfg)[1], 40 if zero == "zero2" else cfg.cutpoint_pairs, cfg.seed + 2)
    assert card.data["cutpoints_tuned_on"]["sampling"] == "natural"
    assert card.data["cutpoints_tuned_on"]["pairs"] == calib.num_rows
    natural = judge.llm_scorer(batch_size=8).score(calib.column("query").to_pylist(), calib.column("text").to_pylist(),
                                                   calib.column("title").to_pylist(), calib.column("url").to_pylist())  # fmt: skip
    human = calib.column("label").to_numpy()
    np.testing.assert_allclose(card.cutpoints, tune_cutpoints(natural.score, human, cfg.grades), atol=1e-4)
    _, val, _ = sample_train_val(cfg)
    rows = {(q, h): None for q, h in zip(val_scores["qid"], val_scores["human"], strict=True)}
    assert len(rows) >= 1
    scores = judge.llm_scorer(batch_size=4).score(val.column("query").to_pylist(), val.column("text").to_pylist(),
                                              val.column("title").to_pylist(), val.column("url").to_pylist())  # fmt: skip
    np.testing.assert_allclose(sorted(scores.score), sorted(val_scores["score"]), atol=1e-4)
    # and the fine-tuned judge differs from the base model (the adapter did something)
    base = load_judge(str(tiny_causal_lm), template=card.prompt_template, dtype="fp32", device="cpu").scorer(
        4
    )
    base_scores = base.score(val.column("query").to_pylist(), val.column("text").to_pylist(),
                             val.column("title").to_pylist(), val.column("url").to_pylist())  # fmt: skip
    assert np.abs(base_scores.score - scores.score).max() > 1e-4


def test_a_killed_worker_resumes_from_the_last_checkpoint_and_a_finished_run_is_reused(
    ray_session, tiny_causal_lm, synth_dataset, tmp_path
):
    """FailureConfig: a worker process that dies (killed by the test's after_step hook at step 2 of the first
    attempt, before step 2's checkpoint) is replaced and training continues from step 1's checkpoint. The same
    config run again reuses the finished run. Another job with another config under the same storage path (two
    jobs sharing a volume) trains a run of its own, and both runs keep their checkpoints."""

    def kill_last_worker_at_step_2(step, rank, world, resumed):
        if step == 2 and rank == world - 1 and not resumed:
            import os
            import time

            # The wait lets Ray Train's controller poll step 1's report first, as it would between real steps:
            # a report made a few ms before a death can be lost, and the restart go back further.
            time.sleep(3)
            os._exit(1)

    out, storage = tmp_path / "judge", tmp_path / "shared-volume"
    cfg = FinetuneConfig(base_model=str(tiny_causal_lm), train=[str(synth_dataset / "pairs")], out=str(out),
                         n_train=16, n_val=8, batch_size=4, max_steps=3, eval_every=1, num_workers=2,
                         dtype="fp32", lr=1e-2, max_failures=1, stack=None, cutpoint_pairs=24,
                         storage_path=str(storage))  # fmt: skip
    finetune(cfg, after_step=kill_last_worker_at_step_2)
    card = JudgeCard.load(out)
    assert card.training["resumed_from_steps"] == [1]
    assert [h["step"] for h in card.training["history"]] == [1, 2, 3]
    assert card.training["deepspeed"] == "zero2" and "no GPU" in card.training["deepspeed_reason"]  # auto
    adapter = (out / "adapter" / "adapter_model.safetensors").read_bytes()
    finetune(cfg)  # the same config: the finished run is reused, nothing trains again
    again = JudgeCard.load(out)
    assert again.training["history"] == card.training["history"]
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == adapter
    other_out = tmp_path / "other-judge"
    finetune(cfg.model_copy(update={"lr": 2e-2, "max_steps": 1, "out": str(other_out)}))
    other = JudgeCard.load(other_out)
    assert other.training["ray_train_run"] != card.training["ray_train_run"]
    assert [h["step"] for h in other.training["history"]] == [1] and other.training[
        "resumed_from_steps"
    ] == []
    for run in (card, other):  # neither job removed the other's checkpoints
        assert Path(run.training["ray_train_run"]).parent == storage
        assert list(Path(run.training["ray_train_run"]).glob("checkpoint_*"))


def test_batch_size_must_split_over_the_workers_and_labels_must_be_grades(synth_dataset, tmp_path):
    with pytest.raises(ConfigError, match=r"batch_size \(8\) must be a multiple of num_workers \(3\)"):
        load_config(FinetuneConfig, None, ["num_workers=3"], train=["x"], out="o")
    cfg = FinetuneConfig(train=[str(synth_dataset / "pairs")], out=str(tmp_path), grades=[0, 1])
    with pytest.raises(ConfigError, match=r"grades: the training pairs have label\(s\) \[2, 3\]"):
        split_pools(cfg)


def test_deepspeed_names_are_checked_when_the_config_loads():
    with pytest.raises(ConfigError, match=r"deepspeed.*zero4.*auto, zero2, zero3, zero3_offload"):
        load_config(FinetuneConfig, None, ["deepspeed=zero4"], train=["x"], out="o")
    assert FinetuneConfig(train=["x"], out="o").deepspeed == "auto"


@pytest.mark.gpu
def test_finetune_on_a_gpu_picks_zero2_for_a_model_that_fits(
    ray_session, tiny_causal_lm, synth_dataset, tmp_path
):
    """deepspeed: auto on a GPU worker: the tiny model fits one GPU many times over, so ZeRO-2, and why."""
    out = tmp_path / "judge"
    cfg = FinetuneConfig(base_model=str(tiny_causal_lm), train=[str(synth_dataset / "pairs")], out=str(out),
                         n_train=8, n_val=8, batch_size=4, max_steps=1, num_workers=1, use_gpu=True,
                         stack=None, cutpoint_pairs=24)  # fmt: skip
    finetune(cfg)
    card = JudgeCard.load(out)
    assert card.training["deepspeed"] == "zero2" and "fit one GPU" in card.training["deepspeed_reason"]
