"""The judge as an artifact: a LoRA adapter plus ``judge_card.json``, and loading any judge for inference.

A judge directory (written by ``augrel judge finetune``)::

    adapter/            PEFT LoRA adapter (adapter_config.json, adapter_model.safetensors)
    judge_card.json     base model, prompt template + version, grades, training data, validation metrics
    config.yaml         the resolved fine-tuning config

``load_judge`` accepts such a directory, or a plain model (hub id, local path, or the offline alias), which is
then a zero-shot judge. Adapters are merged into the base weights for inference: scoring through an unmerged
LoRA on every linear layer ran several times slower than the base model.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from models.judge import DEFAULT_GRADES, LabelTokenScorer
from models.judge_ensemble import EnsembleScorer, GradeCombiner
from models.loading import DEFAULT_JUDGE, LoadedLM, load_causal_lm
from models.prompts import PromptTemplate, get_template

CARD = "judge_card.json"


@dataclass
class JudgeCard:
    base_model: str
    prompt_template: str
    prompt_version: str
    grades: list[int] = field(default_factory=lambda: list(DEFAULT_GRADES))
    max_doc_tokens: int = 256
    max_query_tokens: int = 64
    adapter: str | None = "adapter"
    data: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    #: cut-points on the expected grade tuned for kappa on validation; the judge's labels come from them when it
    #: has no combiner (None: the argmax label)
    cutpoints: list[float] | None = None
    #: the stacked judge's combiner file in this directory (``models.judge_ensemble``), None: the LLM alone
    combiner: str | None = None
    #: what audits found about this judge: ``diffs`` (``augrel judge diff`` against earlier judges, one entry per
    #: A) and ``manipulation`` (the injection benchmark's figures); cards written before audits load without it
    audit: dict[str, Any] = field(default_factory=dict)
    #: the detector of instruction-like spans the judge runs behind (``models.injection``): strip, flag or off
    #: (off for cards written before it existed)
    injection_guard: str = "off"

    @property
    def name(self) -> str:
        name = f"{self.base_model}+lora" if self.adapter else self.base_model
        return name + "+stack" if self.combiner else name

    def template(self) -> PromptTemplate:
        return get_template(self.prompt_template).with_limits(self.max_doc_tokens, self.max_query_tokens)

    def save(self, judge_dir: str | Path) -> Path:
        p = Path(judge_dir) / CARD
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(asdict(self), indent=2, default=str) + "\n")
        return p

    @classmethod
    def load(cls, judge_dir: str | Path) -> JudgeCard:
        return cls(**json.loads((Path(judge_dir) / CARD).read_text()))


def is_judge_dir(path: str | Path) -> bool:
    return (Path(path) / CARD).exists()


@dataclass
class LoadedJudge:
    lm: LoadedLM
    card: JudgeCard
    template: PromptTemplate
    path: Path | None = None  # the judge directory (None: a base model used zero-shot)

    def llm_scorer(self, batch_size: int = 16, **kw: Any) -> LabelTokenScorer:
        """The LLM alone: grade-token probabilities, argmax label."""
        return LabelTokenScorer(
            self.lm.model, self.lm.tokenizer, self.template, self.card.grades, batch_size, **kw
        )

    def scorer(self, batch_size: int = 16, guard: str | None = None, **kw: Any):
        """The judge as its card defines it: the LLM (labels from the card's cut-points when it has them), or
        the LLM stacked with its combiner's signals (the combiner has cut-points of its own), behind the
        card's injection guard (``guard`` overrides it: strip, flag or off)."""
        from models.injection import guarded

        return guarded(self._scorer(batch_size, **kw), guard or self.card.injection_guard)

    def _scorer(self, batch_size: int, **kw: Any) -> LabelTokenScorer | EnsembleScorer:
        if not self.card.combiner or self.path is None:
            return self.llm_scorer(batch_size, cutpoints=self.card.cutpoints, **kw)
        llm = self.llm_scorer(batch_size, **kw)
        combiner = GradeCombiner.load(self.path / self.card.combiner)
        encoder = None
        if combiner.needs_encoder:
            from models.encoder import BiEncoder

            encoder = BiEncoder(combiner.encoder, dtype=combiner.encoder_dtype, device=self.lm.device)
        return EnsembleScorer(llm, combiner, encoder)


def load_judge(
    judge: str = DEFAULT_JUDGE,
    *,
    template: str = "umbrela-v1",
    max_doc_tokens: int = 256,
    dtype: str = "auto",
    device: str = "auto",
    guard: str = "strip",
) -> LoadedJudge:
    """A fine-tuned judge directory (adapter merged), or a base model used zero-shot with ``template`` behind
    the injection ``guard`` (a judge directory's card names its own)."""
    if is_judge_dir(judge):
        card = JudgeCard.load(judge)
        lm = load_causal_lm(card.base_model, dtype=dtype, device=device)
        if card.adapter:
            from peft import PeftModel

            peft_model = PeftModel.from_pretrained(lm.model, str(Path(judge) / card.adapter))
            lm.model = peft_model.merge_and_unload().eval()
        lm.name = str(judge)
        return LoadedJudge(lm, card, card.template(), Path(judge))
    tmpl = get_template(template).with_limits(max_doc_tokens=max_doc_tokens)
    lm = load_causal_lm(judge, dtype=dtype, device=device)
    card = JudgeCard(
        base_model=judge, prompt_template=tmpl.name, prompt_version=tmpl.version, adapter=None,
        max_doc_tokens=tmpl.max_doc_tokens, max_query_tokens=tmpl.max_query_tokens, injection_guard=guard,
    )  # fmt: skip
    return LoadedJudge(lm, card, tmpl)
