import json

import numpy as np
import pytest

from models.judge_card import JudgeCard, load_judge
from models.judge_ensemble import EnsembleScorer, GradeCombiner
from pipelines.calibrate_judge import CalibrateConfig, StackSettings, calibrate
from pipelines.errors import ConfigError
from pipelines.finetune_judge import natural_sample
from pipelines.io import read_table
from pipelines.judge import PredictConfig, predict
from pipelines.stage import load_config


def test_calibration_sample_keeps_the_natural_grade_mix(synth_dataset):
    pool = read_table(synth_dataset / "pairs")
    s = natural_sample(pool, 200, seed=1)
    assert s.num_rows == 200 and natural_sample(pool, 200, seed=1).equals(s)
    # a uniform draw of rows, not a balanced one: each grade's share stays near the pool's
    share = lambda t, g: np.mean(t.column("label").to_numpy() == g)  # noqa: E731
    for g in range(4):
        assert abs(share(s, g) - share(pool, g)) < 0.12
    assert natural_sample(pool, 10**6, seed=1).num_rows == pool.num_rows


def test_stack_settings_name_bad_signals():
    with pytest.raises(ConfigError, match=r"stack\.signals"):
        load_config(
            CalibrateConfig, None, ["stack.signals=[dense_cos, bm42]"], judge="j", pairs=["p"], out="o"
        )


def test_calibrate_a_base_model_then_predict_with_the_stacked_judge(
    ray_session, tiny_causal_lm, synth_dataset, tmp_path
):
    """Zero-shot tiny LM + MiniLM cosine + lexical signals, fit in a Ray task; predict then grades with the stack."""
    out = tmp_path / "stacked"
    cfg = CalibrateConfig(judge=str(tiny_causal_lm), pairs=[str(synth_dataset / "pairs")], out=str(out),
                          dtype="fp32", stack=StackSettings(n_pairs=120, batch_size=8))  # fmt: skip
    r = calibrate(cfg)
    card = JudgeCard.load(out)
    assert card.combiner == "combiner.json" and card.adapter is None and card.name.endswith("+stack")
    report = r.extra["stack"]
    assert report["pairs"] == 120 and set(report["agreement"]) == {
        "stacked (query-fold CV)",
        "LLM alone (argmax)",
    }
    # the synthetic labels follow from word overlap, which a random tiny LM cannot see: the stack must
    comb = GradeCombiner.load(out)
    assert comb.needs_encoder and len(comb.cutpoints) == 3
    assert report["agreement"]["stacked (query-fold CV)"]["cohen_kappa"] > 0.3
    judge = load_judge(str(out), dtype="fp32", device="cpu")
    assert isinstance(judge.scorer(8, guard="off"), EnsembleScorer)
    pred = predict(PredictConfig(judge=str(out), pairs=str(synth_dataset / "pairs"), out=str(tmp_path / "j"),
                                 limit=40, dtype="fp32", batch_size=8))  # fmt: skip
    t = read_table(tmp_path / "j")
    assert pred.counts["judged"] == 40 and set(t.column("judge").to_pylist()) == {card.name}
    assert all("+stack@" in v for v in t.column("prompt_version").to_pylist())
    probs = np.asarray(t.column("probs").to_pylist())
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "judge.calibrate" and manifest["counts"] == {"calibration_pairs": 120}


def test_cli_calibrate_prints_the_stack_and_names_a_bad_key(
    ray_session, tiny_causal_lm, synth_dataset, tmp_path, capsys
):
    from pipelines.cli import main

    out = tmp_path / "cli-stacked"
    rc = main(["judge", "calibrate", "--judge", str(tiny_causal_lm), "--pairs", str(synth_dataset / "pairs"),
               "--out", str(out), "--set", "dtype=fp32", "--set", "stack.n_pairs=60",
               "--set", "stack.signals=[llm_score, overlap]"])  # fmt: skip
    text = capsys.readouterr().out
    assert rc == 0 and "LLM alone (argmax)" in text and f"stacked judge in {out}" in text
    assert (out / "combiner.json").exists() and "dense_cos" not in GradeCombiner.load(out).features
    assert (
        main(["judge", "calibrate", "--judge", "x", "--pairs", "p", "--out", "o", "--set", "stack.nn=3"]) != 0
    )
    assert "stack.nn" in capsys.readouterr().err
