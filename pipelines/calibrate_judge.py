"""``augrel judge calibrate``: stack a judge with cheap relevance signals, fit on held-out labelled pairs.

Takes a judge (a fine-tuned directory, or a base model zero-shot) and labelled pairs of queries the judge never
trained on, draws ``n_pairs`` of them with their natural grade mix (``natural_sample``), scores them with the LLM, adds the MiniLM
cosine and lexical signals, and fits the ``GradeCombiner`` of ``models.judge_ensemble`` (multinomial logistic
regression + kappa cut-points). The card's own cut-points (the LLM alone) are re-tuned on the same pairs. Writes a judge directory whose card names ``combiner.json``: predict, annotate
and serve then grade with the stacked judge. ``augrel judge finetune`` runs this on its validation queries
at the end (its ``stack`` section; ``stack: null`` turns it off).

The scoring runs as one Ray task with the resources asked for (a GPU with ``num_gpus: 1``), so a cluster's
driver pod never loads a 9B model on its CPU.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, field_validator

from models.judge_ensemble import SIGNALS
from pipelines.errors import DataError
from pipelines.stage import StageConfig, StageResult, Timer, write_stage_files

log = logging.getLogger("augrel")


class StackSettings(BaseModel):
    """How the combiner is fit (shared by ``judge calibrate`` and ``judge finetune``'s ``stack`` section)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    n_pairs: int = Field(1000, gt=0, description="calibration pairs, drawn with their natural grade mix")
    signals: list[str] = Field(default_factory=lambda: list(SIGNALS), description=f"of {', '.join(SIGNALS)}")
    c: float = Field(1.0, gt=0, description="inverse L2 strength of the logistic regression")
    encoder: str | None = Field(None, description="dense encoder for dense_cos (default: packaged MiniLM)")
    encoder_dtype: str = Field("auto", pattern="^(auto|bf16|fp32)$")
    select: bool = Field(
        True,
        description="keep only the signals that raise the query-fold cross-validated kappa (greedy forward "
        "selection); false: use every signal listed",
    )
    min_gain: float = Field(
        0.005,
        ge=0,
        description="kappa a signal must add to enter the selection, at the least",
    )
    min_gain_se: float = Field(
        1.0,
        ge=0,
        description="and at least this many standard errors of the gain (paired bootstrap over the calibration "
        "queries): the one-standard-error rule, so small calibration sets do not admit noise; 0 turns it off",
    )
    folds: int = Field(5, ge=2, description="query folds for selection and the cross-validated estimate")
    batch_size: int = Field(16, gt=0)
    num_cpus: float = Field(1, gt=0, description="CPUs of the scoring task")
    num_gpus: float = Field(0, ge=0, description="GPUs of the scoring task (1 on a GPU cluster)")

    def selection(self) -> dict[str, Any]:
        """``fit_stacked``'s selection arguments."""
        return {"c": self.c, "folds": self.folds, "select": self.select, "min_gain": self.min_gain,
                "min_gain_se": self.min_gain_se}  # fmt: skip

    @field_validator("signals")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        bad = [s for s in v if s not in SIGNALS]
        if bad:
            raise ValueError(f"unknown signal(s) {bad}; known: {', '.join(SIGNALS)}")
        if not v:
            raise ValueError("at least one signal")
        return v


class CalibrateConfig(StageConfig):
    """``augrel judge calibrate``: which judge, which held-out labelled pairs, where the stacked judge goes."""

    judge: str = Field(description="judge directory (from finetune) or a base model, used zero-shot")
    pairs: list[str] = Field(description="labelled pairs of queries the judge did not train on")
    out: str = Field(description="output judge directory (may be the judge directory itself)")
    template: str = Field("umbrela-v1", description="prompt template for a base model")
    max_doc_tokens: int = Field(256, gt=0, description="passage truncation for a base model")
    dtype: str = Field("auto", pattern="^(auto|bf16|fp32)$")
    seed: int = 13
    stack: StackSettings = StackSettings()

    @field_validator("pairs", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v


def fit_stack(
    judge: str,
    pairs: dict[str, list],
    stack: dict[str, Any],
    *,
    template: str = "umbrela-v1",
    max_doc_tokens: int = 256,
    dtype: str = "auto",
    device: str = "auto",
) -> dict[str, Any]:
    """Score ``pairs`` (columns qid, query, text, title, url, label) with ``judge``'s LLM, fit the combiner.

    Returns the combiner as a dict and its cross-validated agreement; runs wherever it is called (a Ray task
    in ``calibrate``)."""
    from dataclasses import asdict

    from eval.agreement import agreement, tune_cutpoints
    from models.judge_card import load_judge
    from models.judge_ensemble import cross_validated_grades, fit_stacked, pair_signals

    s = StackSettings.model_validate(stack)
    j = load_judge(judge, template=template, max_doc_tokens=max_doc_tokens, dtype=dtype, device=device)
    grades = list(j.card.grades)
    texts = pairs["text"]
    if j.card.injection_guard == "strip":  # fit on the text the judge will read
        from models.injection import InjectionDetector

        detector = InjectionDetector()
        texts = [detector.strip(t, q) for q, t in zip(pairs["query"], texts, strict=True)]
    llm = j.llm_scorer(s.batch_size).score(pairs["query"], texts, pairs["title"], pairs["url"])
    encoder = None
    if "dense_cos" in s.signals:
        from models.encoder import BiEncoder

        encoder = BiEncoder(s.encoder, dtype=s.encoder_dtype, device=j.lm.device)
    sig = pair_signals(llm, pairs["query"], texts, grades, encoder, s.signals)
    human, qids = np.asarray(pairs["label"], dtype=int), np.asarray(pairs["qid"])
    combiner, path = fit_stacked(sig, human, qids, grades, s.signals, **s.selection(), encoder=s.encoder,
                                 encoder_dtype=s.encoder_dtype)  # fmt: skip
    use = combiner.signals
    if not set(use) & {"llm_logp", "llm_score"}:
        log.warning("the LLM's signals did not raise the held-out kappa on the calibration pairs: the stacked "
                    "judge grades from %s alone and skips the LLM (a stronger base model is the lever)", use)  # fmt: skip
    rows = {}
    if len(set(qids.tolist())) >= 2:
        cv_label, cv_score = cross_validated_grades(sig, human, qids, grades, use, s.c, s.folds)
        rows["stacked (query-fold CV)"] = agreement(human, cv_label, cv_score, qids, grades, n_boot=200)
    rows["LLM alone (argmax)"] = agreement(human, llm.label, llm.score, qids, grades, n_boot=200)
    report = {
        name: {k: r.metrics[k] for k in ("cohen_kappa", "weighted_kappa_quadratic", "kendall_tau_b_pooled")}
        | {"cohen_kappa_ci95": r.ci95.get("cohen_kappa")}
        for name, r in rows.items()
    }
    combiner.fit_report = {"pairs": len(human), "queries": len(set(qids.tolist())), "agreement": report,
                           "grades": {str(g): int((human == g).sum()) for g in grades},
                           "signals": use, "selection": path,
                           "llm_cutpoints": tune_cutpoints(llm.score, human, grades)}  # fmt: skip
    return asdict(combiner)


def tune_llm_cutpoints(
    judge: str, pairs: dict[str, list], *, batch_size: int = 16, dtype: str = "auto", device: str = "auto"
) -> list[float]:
    """The cut-points of ``judge``'s LLM, tuned for kappa on ``pairs`` (columns query, text, title, url, label):
    labelled pairs of held-out queries in the grade mix the judge will grade. Runs where it is called."""
    from eval.agreement import tune_cutpoints
    from models.judge_card import load_judge

    j = load_judge(judge, dtype=dtype, device=device)
    llm = j.llm_scorer(batch_size).score(pairs["query"], pairs["text"], pairs["title"], pairs["url"])
    return tune_cutpoints(llm.score, np.asarray(pairs["label"], dtype=int), list(j.card.grades))


def natural_cutpoints(
    judge: str,
    table: pa.Table,
    *,
    num_gpus: float = 0,
    num_cpus: float = 1,
    batch_size: int = 16,
    dtype: str = "auto",
) -> list[float]:
    """``tune_llm_cutpoints`` in a Ray task with these resources (a GPU on a cluster: the driver pod never loads
    the model)."""  # fmt: skip
    import ray

    from models.loading import device_for_gpus

    cols = {c: table.column(c).to_pylist() for c in ("query", "text", "title", "url", "label")}
    task = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_calls=1)(tune_llm_cutpoints)
    return ray.get(
        task.remote(judge, cols, batch_size=batch_size, dtype=dtype, device=device_for_gpus(num_gpus))
    )


def stack_judge(judge: str, out: Path, table: pa.Table, stack: StackSettings, **kw: Any) -> dict[str, Any]:
    """Fit the combiner in a Ray task and write the stacked judge into ``out`` (a copy of ``judge``'s directory,
    or a new card for a base model). Returns the combiner's fit report."""
    import ray

    from models.judge_card import JudgeCard, is_judge_dir
    from models.judge_ensemble import COMBINER_FILE, GradeCombiner, describe_selection
    from models.loading import device_for_gpus
    from models.prompts import get_template

    cols = {c: table.column(c).to_pylist() for c in ("qid", "query", "text", "title", "url", "label")}
    # max_calls=1: the worker exits with the models it loaded; Ray would otherwise keep it idle for reuse, and a
    # later stage's small tasks (annotate's reads) would run in a process still holding ~800 MB
    task = ray.remote(num_cpus=stack.num_cpus, num_gpus=stack.num_gpus, max_calls=1)(fit_stack)
    device = device_for_gpus(stack.num_gpus)
    combiner = GradeCombiner(**ray.get(task.remote(judge, cols, stack.model_dump(), device=device, **kw)))
    if combiner.fit_report.get("selection"):  # logged here: the task's own log lines stay in its worker's log
        log.info(
            "stack selection by query-fold CV kappa: %s", describe_selection(combiner.fit_report["selection"])
        )
    out.mkdir(parents=True, exist_ok=True)
    if is_judge_dir(judge):
        card = JudgeCard.load(judge)
        src = Path(judge)
        if src.resolve() != out.resolve() and card.adapter:
            if (out / card.adapter).exists():
                shutil.rmtree(out / card.adapter)
            shutil.copytree(src / card.adapter, out / card.adapter)
    else:
        tmpl = get_template(kw.get("template", "umbrela-v1")).with_limits(kw.get("max_doc_tokens", 256))
        card = JudgeCard(base_model=judge, prompt_template=tmpl.name, prompt_version=tmpl.version, adapter=None,
                         max_doc_tokens=tmpl.max_doc_tokens, max_query_tokens=tmpl.max_query_tokens,
                         injection_guard="strip")  # as load_judge reads a base model  # fmt: skip
    combiner.save(out)
    card.combiner = COMBINER_FILE
    # the LLM's own cut-points, tuned on the same natural-mix pairs (used where the LLM grades alone)
    card.cutpoints = combiner.fit_report["llm_cutpoints"]
    card.metrics = {**card.metrics, "stack": combiner.fit_report}
    card.save(out)
    return combiner.fit_report


def calibrate(cfg: CalibrateConfig) -> StageResult:
    from cluster.embedded import init_ray
    from pipelines.finetune_judge import _labelled, natural_sample

    init_ray()
    out = Path(cfg.out)
    with Timer() as timer:
        pool = _labelled(cfg.pairs)
        table = natural_sample(pool, cfg.stack.n_pairs, cfg.seed)
        if len(set(table.column("label").to_pylist())) < 2:
            raise DataError(f"{cfg.pairs}: calibration pairs need at least two different grades")
        report = stack_judge(cfg.judge, out, table, cfg.stack, template=cfg.template,
                             max_doc_tokens=cfg.max_doc_tokens, dtype=cfg.dtype)  # fmt: skip
    return write_stage_files(
        out, "judge.calibrate", cfg, {"calibration_pairs": table.num_rows}, cfg.pairs, timer.seconds,
        {"stack": report},
    )  # fmt: skip
