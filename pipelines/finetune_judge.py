"""``augrel judge finetune``: LoRA fine-tuning of the relevance judge on Ray Train + DeepSpeed.

Paper 1's recipe: about 1,000 class-balanced human labels for training and 250 for validation, split by query,
LoRA on a small causal LM, loss = cross-entropy over the grade tokens at the answer position.

Runs as a Ray Train ``TorchTrainer``: each worker holds the model with a PEFT LoRA adapter inside a DeepSpeed
engine (``deepspeed: auto`` picks ZeRO-2, ZeRO-3 or ZeRO-3 with CPU offload from the model's size and the workers'
GPU memory, see ``cluster.profiles.choose_deepspeed``; bf16 where supported; gloo on CPU, NCCL on GPU). Each
worker resolves the base model on its own node (the offline alias converts into that node's cache): the driver
ships the model's name, never a path of its own node.
Checkpoints (adapter, optimizer and scheduler state, step) are reported to Ray Train at every evaluation and
``FailureConfig`` restarts a run whose worker died from the last one. The best checkpoint by validation kappa
(not loss: labels are noisy, see ../shared/notes/judge-levers.md) becomes the judge:

    OUT/adapter/          the LoRA adapter (safetensors)
    OUT/judge_card.json   base model, prompt version, data, validation metrics, tuned cut-points
    OUT/config.yaml       this config, resolved

Runs are named by a fingerprint of config + data under ``storage_path``; a run never removes another (two jobs
sharing a volume keep their checkpoints; ``resume: false`` restarts only its own run).

Training examples are few (about a thousand), so the driver samples them once and each worker takes a
deterministic slice of each epoch's permutation: a resumed run sees exactly the batches it had not seen.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field, field_validator

from pipelines import tables as T
from pipelines.calibrate_judge import StackSettings, natural_cutpoints, stack_judge
from pipelines.data import assign_splits
from pipelines.errors import ConfigError, DataError
from pipelines.io import read_table
from pipelines.stage import StageConfig, StageResult, Timer, write_stage_files

log = logging.getLogger("augrel")


class LoraSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    r: int = Field(16, gt=0)
    alpha: int = Field(32, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1, description="0 by default: LoRA dropout costs ~8% of a CPU step")
    target_modules: str | list[str] = Field("all-linear", description="'all-linear' or module names")


class InjectionSettings(BaseModel):
    """Defences against passages that talk the judge into a grade (``models.injection``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rate: float = Field(
        0.25,
        ge=0,
        le=1,
        description="training-time augmentation: this share of the sampled grade-0 training pairs gets an "
        "injected copy (a relevance claim, fake assessor note, 'Relevance: 3', ... in the 'train' phrasings, at "
        "a random position) with its label unchanged, added to the training pairs",
    )
    guard: Literal["off", "flag", "strip"] = Field(
        "strip",
        description="the judge's detector of instruction-like spans, recorded in its card: strip grades the "
        "passage without them, flag only marks them (judgments' injection / injection_kind columns), off skips it",
    )


class FinetuneConfig(StageConfig):
    """``augrel judge finetune``: base model, data, LoRA, optimisation and the Ray Train / DeepSpeed setup."""

    base_model: str = Field("gemma3-270m", description="hub id, local path, or the offline gemma3-270m")
    train: list[str] = Field(
        description="labelled pairs tables to sample training (and validation) pairs from"
    )
    val: list[str] | None = Field(
        None, description="labelled pairs for validation; default: split train by query"
    )
    out: str = Field(description="output directory for the judge")
    template: str = Field(
        "umbrela-fenced-v1",
        description="prompt template (models/prompts.py); the default quotes the passage as data, a defence "
        "against passages that try to set their own grade (benchmarks/judge_manipulation.py)",
    )
    max_doc_tokens: int = Field(192, gt=0)
    max_query_tokens: int = Field(48, gt=0)
    grades: list[int] = Field(default_factory=lambda: list(T.DEFAULT_GRADES))
    n_train: int = Field(1000, gt=0, description="training pairs to sample")
    n_val: int = Field(250, gt=0, description="validation pairs to sample")
    sampling: Literal["balanced", "natural"] = Field(
        "balanced", description="even across grades, or as found"
    )
    val_fraction: float = Field(
        0.2, gt=0, lt=1, description="share of queries held out when val is not given"
    )
    seed: int = 13
    lora: LoraSettings = LoraSettings()
    epochs: int = Field(2, gt=0)
    max_steps: int | None = Field(None, gt=0, description="stop after this many optimizer steps")
    batch_size: int = Field(8, gt=0, description="pairs per optimizer step, over all workers")
    lr: float = Field(2e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    prefix_grad: bool = Field(
        False,
        description="back-propagate through the shared instruction prefix; off: its KV cache is computed once "
        "per step without gradients (the rubric is the same for every pair), which saves its compute",
    )
    eval_every: int | None = Field(
        None, gt=0, description="evaluate + checkpoint every N steps (default: per epoch)"
    )
    num_workers: int = Field(2, gt=0)
    use_gpu: bool = False
    cpus_per_worker: int = Field(1, gt=0)
    deepspeed: str = Field(
        "auto",
        description="auto (from the model's size and the GPUs' memory: ZeRO-2 when the bf16 base fits one GPU, "
        "ZeRO-3 when a shard does, ZeRO-3 with CPU offload otherwise), zero2, zero3, zero3_offload, or a path "
        "to a DeepSpeed JSON",
    )
    dtype: str = Field("auto", pattern="^(auto|bf16|fp32)$")
    max_failures: int = Field(
        2, ge=0, description="worker failures to recover from (from the last checkpoint)"
    )
    storage_path: str | None = Field(None, description="Ray Train storage (default: OUT/ray_train)")
    resume: bool = Field(
        True, description="continue from OUT/ray_train's last checkpoint if a run was cut off"
    )
    cutpoint_pairs: int = Field(
        1000,
        gt=0,
        description="validation-query pairs, drawn in their natural grade mix, the judge's cut-points are tuned "
        "on (with a stack: the stack's n_pairs); the class-balanced validation sample only ranks checkpoints",
    )
    injection: InjectionSettings = InjectionSettings()
    stack: StackSettings | None = Field(
        default_factory=StackSettings,
        description="after training, stack the judge with MiniLM cosine and lexical signals, fit on the "
        "validation queries' pairs in their natural grade mix (see `augrel judge calibrate`); null: the LLM alone",
    )

    @field_validator("train", "val", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @field_validator("deepspeed")
    @classmethod
    def _known_deepspeed(cls, v: str) -> str:
        from cluster.profiles import deepspeed_names

        if v != "auto" and not Path(v).suffix and v not in deepspeed_names():
            raise ValueError(
                f"{v!r}: use auto, {', '.join(deepspeed_names())}, or a path to a DeepSpeed JSON"
            )
        return v

    @field_validator("num_workers")
    @classmethod
    def _batch_splits_evenly(cls, v: int, info: Any) -> int:
        batch = info.data.get("batch_size")
        if batch is not None and batch % v:
            raise ValueError(
                f"batch_size ({batch}) must be a multiple of num_workers ({v}): each worker takes "
                f"batch_size / num_workers pairs per step"
            )
        return v


# ---------------------------------------------------------------------------------------------- data


def class_balanced_sample(table: pa.Table, n: int, grades: list[int], seed: int) -> pa.Table:
    """``n`` rows spread evenly over the grades (paper 1: classes evenly balanced).

    A grade with fewer rows than its share gives all it has and the remainder is spread over the others, so
    the sample still has ``n`` rows when the table has them. Deterministic for the seed.
    """
    rng = np.random.default_rng(seed)
    labels = table.column("label").to_numpy(zero_copy_only=False)
    pools = {g: rng.permutation(np.flatnonzero(labels == g)) for g in grades}
    want = {g: 0 for g in grades}
    remaining = min(n, sum(len(p) for p in pools.values()))
    open_grades = [g for g in grades if len(pools[g])]
    while remaining and open_grades:
        share = max(1, remaining // len(open_grades))
        for g in list(open_grades):
            take = min(share, len(pools[g]) - want[g], remaining)
            want[g] += take
            remaining -= take
            if want[g] == len(pools[g]):
                open_grades.remove(g)
            if not remaining:
                break
    idx = np.concatenate([pools[g][: want[g]] for g in grades])
    return table.take(pa.array(rng.permutation(idx)))


def natural_sample(table: pa.Table, n: int, seed: int) -> pa.Table:
    """``n`` rows in the grade mix the table has (all of them when fewer), deterministic for the seed."""
    rng = np.random.default_rng(seed)
    return table.take(pa.array(rng.permutation(table.num_rows)[: min(n, table.num_rows)]))


def _labelled(paths: list[str]) -> pa.Table:
    parts = []
    for p in paths:
        t = T.conform(T.PAIRS, read_table(p), p)
        good, bad = T.split_rejected(T.PAIRS, t, source=p)
        if bad.num_rows:
            log.warning("%s: %d pairs skipped (%s)", p, bad.num_rows, bad.column("reason")[0].as_py())
        # optional in a pairs table (review import writes no url): null when absent
        for col in ("title", "url"):
            if col not in good.schema.names:
                good = good.append_column(col, pa.nulls(good.num_rows, pa.string()))
        parts.append(good.select(["qid", "docid", "query", "text", "title", "url", "label"]))
    t = pa.concat_tables(parts)
    t = t.filter(pc.is_valid(t.column("label")))
    if t.num_rows == 0:
        raise DataError(f"no labelled pairs in {paths}")
    return t


def split_pools(cfg: FinetuneConfig) -> tuple[pa.Table, pa.Table]:
    """All labelled training pairs and all validation pairs, disjoint by query."""
    pool = _labelled(cfg.train)
    if cfg.val:
        val_pool = _labelled(cfg.val)
        overlap = set(pool.column("qid").to_pylist()) & set(val_pool.column("qid").to_pylist())
        if overlap:
            pool = pool.filter(pc.invert(pc.is_in(pool.column("qid"), value_set=pa.array(sorted(overlap)))))
            log.warning("dropped %d training queries that are also validation queries", len(overlap))
    else:
        split = assign_splits(pool.column("qid").to_pylist(), {"train": 1 - cfg.val_fraction, "val": cfg.val_fraction},
                              cfg.seed)  # fmt: skip
        val_q = pa.array([q for q, s in split.items() if s == "val"], pa.string())
        in_val = pc.is_in(pool.column("qid"), value_set=val_q)
        val_pool, pool = pool.filter(in_val), pool.filter(pc.invert(in_val))
    for name, t in (("training", pool), ("validation", val_pool)):
        if t.num_rows == 0:
            raise DataError(f"no {name} pairs left after splitting {cfg.train} by query (val: {cfg.val})")
        extra = sorted(set(t.column("label").to_pylist()) - set(cfg.grades))
        if extra:
            raise ConfigError(
                f"grades: the {name} pairs have label(s) {extra}, not among grades {cfg.grades}"
            )
    return pool, val_pool


def _grade_hist(t: pa.Table, grades: list[int]) -> dict[str, int]:
    return {str(g): int(pc.sum(pc.equal(t.column("label"), g)).as_py() or 0) for g in grades}


def sample_train_val(
    cfg: FinetuneConfig, pools: tuple[pa.Table, pa.Table] | None = None
) -> tuple[pa.Table, pa.Table, dict[str, Any]]:
    """Training and validation pairs, disjoint by query, sampled as configured."""
    pool, val_pool = pools or split_pools(cfg)
    if cfg.sampling == "balanced":
        train = class_balanced_sample(pool, cfg.n_train, cfg.grades, cfg.seed)
        val = class_balanced_sample(val_pool, cfg.n_val, cfg.grades, cfg.seed + 1)
    else:
        train, val = (
            natural_sample(pool, cfg.n_train, cfg.seed),
            natural_sample(val_pool, cfg.n_val, cfg.seed + 1),
        )

    summary = {
        "train_sources": cfg.train,
        "val_sources": cfg.val or "held-out queries of train",
        "train_pairs": train.num_rows,
        "val_pairs": val.num_rows,
        "train_queries": len(pc.unique(train.column("qid"))),
        "val_queries": len(pc.unique(val.column("qid"))),
        "train_grades": _grade_hist(train, cfg.grades),
        "val_grades": _grade_hist(val, cfg.grades),
        "sampling": cfg.sampling,
    }
    # the counts above are the human-labelled sample; injected copies are counted on their own
    train, injected = with_injected_negatives(train, cfg)
    if injected:
        summary["injected"] = injected
    return train, val, summary


def with_injected_negatives(train: pa.Table, cfg: FinetuneConfig) -> tuple[pa.Table, dict[str, Any]]:
    """``train`` plus injected copies of a share ``cfg.injection.rate`` of its lowest-grade pairs (label
    unchanged: a claim of relevance does not make a passage relevant), and a summary for the judge card. The
    copies use the attacks' ``train`` phrasings, never the ones ``benchmarks/judge_manipulation.py`` scores."""
    from models.injection import injected_copies

    if not cfg.injection.rate:
        return train, {}
    neg = pc.equal(train.column("label"), min(cfg.grades))
    negatives = train.filter(neg)
    copies = injected_copies(negatives.column("query").to_pylist(), negatives.column("text").to_pylist(),
                             cfg.injection.rate, cfg.seed + 7)  # fmt: skip
    if not copies:
        return train, {}
    rows = negatives.take(pa.array([i for i, _, _ in copies]))
    docids = [
        f"{d}#injected-{name}"
        for d, (_, _, name) in zip(rows.column("docid").to_pylist(), copies, strict=True)
    ]
    rows = rows.set_column(rows.schema.get_field_index("docid"), "docid", pa.array(docids, pa.string()))
    rows = rows.set_column(
        rows.schema.get_field_index("text"), "text", pa.array([t for _, t, _ in copies], pa.string())
    )
    attacks: dict[str, int] = {}
    for _, _, name in copies:
        attacks[name] = attacks.get(name, 0) + 1
    # the copies are added to the sample, so grade 0 weighs (1 + rate) times its sampled share: recorded
    summary = {"rate": cfg.injection.rate, "pairs": len(copies), "of_negatives": negatives.num_rows,
               "attacks": dict(sorted(attacks.items())), "phrasings": "train",
               "train_grades_with_copies": {**_grade_hist(train, cfg.grades),
                                            str(min(cfg.grades)): negatives.num_rows + len(copies)}}  # fmt: skip
    return pa.concat_tables([train, rows.cast(train.schema)]), summary


# ------------------------------------------------------------------------------------ worker loop


#: config fields that do not change what is trained
_NOT_TRAINING = {"out", "resume", "storage_path", "max_failures", "stack", "cutpoint_pairs"}


def training_fingerprint(cfg: FinetuneConfig, train: pa.Table, val: pa.Table) -> str:
    """12 hex digits over the training settings (the base model's name among them) and the sampled pairs
    (Ray Train's run name). The name, not a resolved path: the offline alias resolves into each node's cache."""
    import hashlib

    # the injection guard acts at inference only: changing it must not retrain
    exclude = {**dict.fromkeys(_NOT_TRAINING, True), "injection": {"guard"}}
    h = hashlib.sha256(json.dumps(cfg.model_dump(mode="json", exclude=exclude), sort_keys=True).encode())
    for t in (train, val):
        h.update(json.dumps(t.select(["qid", "docid", "label"]).to_pydict(), default=str).encode())
    return h.hexdigest()[:12]


def _rows(t: pa.Table) -> list[dict[str, Any]]:
    return t.select(["qid", "query", "text", "title", "url", "label"]).to_pylist()


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: model + LoRA inside a DeepSpeed engine; train, evaluate, checkpoint."""
    import deepspeed
    import ray.train
    import torch
    import torch.distributed as dist
    from peft import LoraConfig, get_peft_model

    from cluster.profiles import choose_deepspeed, deepspeed_config, zero_stage
    from eval.agreement import agreement, cohen_kappa, grades_from_cutpoints, tune_cutpoints
    from models.judge import (
        GradeHead,
        LabelTokenScorer,
        PairEncoder,
        output_cache,
        pad_left,
        shared_prefix_cache,
    )
    from models.loading import load_causal_lm, parameter_count, resolve_dtype
    from models.losses import GradeTokenCrossEntropy
    from models.prompts import get_template

    cfg = FinetuneConfig.model_validate(config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.seed + rank)
    if not cfg.use_gpu:
        torch.set_num_threads(cfg.cpus_per_worker)
    device = str(ray.train.torch.get_device()) if cfg.use_gpu else "cpu"

    dtype = "bf16" if resolve_dtype(cfg.dtype, device) == torch.bfloat16 else "fp32"
    ds_name, ds_reason = cfg.deepspeed, "set in the config"
    if ds_name == "auto":
        # The smallest GPU of any worker decides, and every rank takes the same decision (ZeRO stages differ
        # in their collectives: ranks that disagreed would hang).
        gpu = torch.cuda.get_device_properties(torch.device(device)).total_memory if cfg.use_gpu else 0
        gpus: list[Any] = [None] * world
        dist.all_gather_object(gpus, gpu)
        ds_name, ds_reason = choose_deepspeed(parameter_count(cfg.base_model), min(gpus) or None, world,
                                              2 if dtype == "bf16" else 4)  # fmt: skip
    if rank == 0:
        print(f"deepspeed: {ds_name} ({ds_reason})", flush=True)
    # Under ZeRO-3 DeepSpeed partitions the weights itself (to GPUs, or to CPU with offload): loading the whole
    # model onto each GPU first would need the memory ZeRO-3 is there to save. The dtype follows the device
    # that trains, not the one that loads. The model is resolved here, on this worker's node.
    lm = load_causal_lm(cfg.base_model, dtype=dtype, device="cpu" if zero_stage(ds_name) == 3 else device)
    bf16 = lm.dtype == torch.bfloat16
    template = get_template(cfg.template).with_limits(cfg.max_doc_tokens, cfg.max_query_tokens)
    encoder = PairEncoder(lm.tokenizer, template, cfg.grades)
    lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=cfg.lora.target_modules, task_type="CAUSAL_LM")  # fmt: skip
    # LoRA weights stay in the model's dtype: DeepSpeed's bf16 optimizer keeps the fp32 master copy. (fp32
    # LoRA weights in a bf16 model would cast every activation twice per layer, seen as >50% of step time.)
    model = get_peft_model(lm.model, lora)

    train_rows, val_rows = config["train"], config["val"]
    micro = cfg.batch_size // world  # FinetuneConfig checks batch_size is a multiple of num_workers
    steps_per_epoch = max(1, len(train_rows) // (micro * world))
    total_steps = min(cfg.max_steps or 10**9, steps_per_epoch * cfg.epochs)
    eval_every = cfg.eval_every or steps_per_epoch
    warmup = int(cfg.warmup_ratio * total_steps)

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / max(1, warmup)) * max(0.0, 1 - s / max(1, total_steps))
    )
    ds_cfg = deepspeed_config(ds_name, train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=1,
                              bf16=bf16)  # fmt: skip
    ds_cfg["zero_force_ds_cpu_optimizer"] = (
        False  # our torch AdamW also with ZeRO-Offload: no JIT-built op needed
    )
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=params, optimizer=optimizer, lr_scheduler=scheduler, config=ds_cfg
    )
    loss_fn = GradeTokenCrossEntropy(encoder.grade_ids, cfg.label_smoothing)
    head = GradeHead(engine.module, encoder.grade_ids)
    grade_index = {g: i for i, g in enumerate(cfg.grades)}
    prefix = torch.tensor([encoder.prefix_ids], device=engine.device)

    step, start_epoch, history, resumed_from = 0, 0, [], []
    ckpt = ray.train.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            # the checkpoint holds the LoRA weights and optimizer state only (the base model is frozen)
            engine.load_checkpoint(os.path.join(d, "deepspeed"), tag="ckpt", load_module_strict=False)
            state = json.loads(Path(d, "state.json").read_text())
            step, history = state["step"], state["history"]
            resumed_from = [*state.get("resumed_from", []), step]
        start_epoch = step // steps_per_epoch
        if rank == 0:
            print(f"resumed from step {step}", flush=True)

    def forward_logits(batch: list[dict]) -> torch.Tensor:
        suffixes = [encoder.encode(r["query"], r["text"], r["title"], r["url"]).ids for r in batch]
        ids, mask = pad_left(suffixes, lm.tokenizer.pad_token_id or 0)
        ids, mask = ids.to(engine.device), mask.to(engine.device)
        b, p = ids.shape[0], prefix.shape[1]
        # The decoder is called through the DeepSpeed-wrapped module: ZeRO's parameter hooks live on the
        # submodules, and GradeHead reads only the grade rows of the LM head (see models.judge).
        if cfg.prefix_grad:
            full_ids, full_mask = pad_left(
                [encoder.prefix_ids + s for s in suffixes], lm.tokenizer.pad_token_id or 0
            )
            pos = (full_mask.cumsum(1) - 1).clamp(min=0)
            logits, _ = head(input_ids=full_ids.to(engine.device), attention_mask=full_mask.to(engine.device),
                             position_ids=pos.to(engine.device), use_cache=False)  # fmt: skip
        else:
            with torch.no_grad():
                cache = shared_prefix_cache(output_cache(head.decoder(input_ids=prefix, use_cache=True)), b)
            attention = torch.cat([torch.ones((b, p), dtype=mask.dtype, device=mask.device), mask], dim=1)
            pos = (p + mask.cumsum(1) - 1).clamp(min=p)
            logits, _ = head(input_ids=ids, attention_mask=attention, position_ids=pos, past_key_values=cache,
                             use_cache=True)  # fmt: skip
        return logits

    def evaluate() -> dict[str, Any]:
        engine.eval()
        # Every rank scores the same number of batches: ZeRO-3 gathers parameters collectively per forward.
        per_rank = math.ceil(len(val_rows) / world)
        mine = (val_rows[rank::world] + val_rows[:1] * per_rank)[:per_rank]
        scorer = LabelTokenScorer(engine.module, lm.tokenizer, template, cfg.grades, batch_size=max(micro, 8),
                                  prefix_cache=True)  # fmt: skip
        r = scorer.score([x["query"] for x in mine], [x["text"] for x in mine],
                         [x["title"] for x in mine], [x["url"] for x in mine])  # fmt: skip
        n_real = len(val_rows[rank::world])
        local = {"score": r.score[:n_real].tolist(), "label": r.label[:n_real].tolist(),
                 "probs": r.probs[:n_real].tolist(),
                 "human": [x["label"] for x in val_rows[rank::world]], "qid": [x["qid"] for x in val_rows[rank::world]]}  # fmt: skip
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, local)
        merged = {k: [x for g in gathered for x in g[k]] for k in local}
        human, score = np.array(merged["human"]), np.array(merged["score"])
        rep = agreement(
            human, np.array(merged["label"]), score, np.array(merged["qid"]), cfg.grades, n_boot=0
        )
        # Kappa of labels cut from the expected grade (how the judge will grade): the argmax of a model trained
        # on the natural mix is grade 0 for nearly every pair, so its kappa cannot rank checkpoints. The
        # cut-points are tuned on these same pairs, so the figure is optimistic, but alike for every checkpoint.
        cut_labels = grades_from_cutpoints(score, tune_cutpoints(score, human, cfg.grades), cfg.grades)
        kappa_cut = cohen_kappa(human, cut_labels, cfg.grades)
        engine.train()
        return {"val_kappa_cut": kappa_cut, "val_kappa": rep.metrics["cohen_kappa"],
                "val_weighted_kappa": rep.metrics["weighted_kappa_quadratic"],
                "val_tau": rep.metrics["kendall_tau_b_pooled"], "val_accuracy": rep.metrics["accuracy"],
                "val_scores": merged}  # fmt: skip

    engine.train()
    t_start, losses = time.perf_counter(), []
    for epoch in range(start_epoch, cfg.epochs):
        order = np.random.default_rng(cfg.seed + epoch).permutation(len(train_rows))
        for i in range(steps_per_epoch):
            if epoch * steps_per_epoch + i < step:  # already trained before a restart
                continue
            if step >= total_steps:
                break
            lo = i * micro * world + rank * micro
            batch = [train_rows[j] for j in order[lo : lo + micro]]
            targets = torch.tensor([grade_index[r["label"]] for r in batch], device=engine.device)
            loss = loss_fn(forward_logits(batch), targets)
            engine.backward(loss)
            engine.step()
            step += 1
            if config.get("after_step") is not None:  # a caller's hook: the recovery test kills a worker
                config["after_step"](step=step, rank=rank, world=world, resumed=bool(ckpt))
            losses.append(float(loss.detach()))
            if step % eval_every == 0 or step == total_steps:
                metrics = evaluate()
                val_scores = metrics.pop("val_scores")
                elapsed = time.perf_counter() - t_start
                metrics.update(step=step, epoch=epoch, train_loss=float(np.mean(losses)) if losses else float("nan"),
                               lr=float(scheduler.get_last_lr()[0]), seconds=round(elapsed, 1))  # fmt: skip
                history.append(metrics)
                losses = []
                with tempfile.TemporaryDirectory() as tmp:
                    # frozen base weights stay out: for a 9B judge they are ~18 GB per checkpoint, unchanged
                    engine.save_checkpoint(
                        os.path.join(tmp, "deepspeed"), tag="ckpt", exclude_frozen_parameters=True
                    )
                    # Under ZeRO-3 the LoRA weights are partitioned across ranks: gather them (a collective,
                    # so every rank enters) before rank 0 writes the adapter.
                    gather = (deepspeed.zero.GatheredParameters(params, modifier_rank=None)
                              if engine.zero_optimization_stage() == 3 else contextlib.nullcontext())  # fmt: skip
                    with gather:
                        if rank == 0:
                            engine.module.save_pretrained(os.path.join(tmp, "adapter"))
                    if rank == 0:
                        Path(tmp, "state.json").write_text(json.dumps(
                            {"step": step, "history": history, "resumed_from": resumed_from,
                             "deepspeed": ds_name, "deepspeed_reason": ds_reason}))  # fmt: skip
                        Path(tmp, "val_scores.json").write_text(json.dumps(val_scores))
                        print(f"step {step}/{total_steps} loss {metrics['train_loss']:.4f} "
                              f"val kappa {metrics['val_kappa']:.3f} (cut-points {metrics['val_kappa_cut']:.3f}) "
                              f"tau {metrics['val_tau']:.3f} "
                              f"({elapsed:.0f}s)", flush=True)  # fmt: skip
                    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        if step >= total_steps:
            break


# ------------------------------------------------------------------------------------------ driver


def _nan_low(x: float | None) -> float:
    return float("-inf") if x is None or math.isnan(x) else x


def finetune(cfg: FinetuneConfig, *, after_step: Callable[..., None] | None = None) -> StageResult:
    """Sample the data, run the Ray Train job, and write the best checkpoint as a judge directory.

    ``after_step``: called on every worker after each optimizer step, before that step's checkpoint, with
    ``step``, ``rank``, ``world`` and ``resumed`` (the attempt started from a checkpoint) as keywords; it is
    shipped to the workers, so it must pickle. The killed-worker recovery test kills a worker from it."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from cluster.embedded import init_ray
    from models.judge_card import JudgeCard
    from models.prompts import get_template

    out = Path(cfg.out).resolve()
    init_ray()
    with Timer() as timer:
        pools = split_pools(cfg)
        train, val, data_summary = sample_train_val(cfg, pools)
        injected = data_summary.get("injected", {}).get("pairs", 0)
        if train.num_rows < cfg.batch_size:
            raise ConfigError(
                f"batch_size: {cfg.batch_size} is more than the {train.num_rows} training pairs"
            )
        storage = Path(cfg.storage_path or out / "ray_train").resolve()
        run_name = f"finetune-{training_fingerprint(cfg, train, val)}"
        run_config = RunConfig(
            name=run_name,
            storage_path=str(storage),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(
                num_to_keep=2, checkpoint_score_attribute="val_kappa_cut", checkpoint_score_order="max"
            ),
        )
        loop_config = {"cfg": cfg.model_dump(mode="json"), "train": _rows(train), "val": _rows(val),
                       "after_step": after_step}  # fmt: skip
        scaling = ScalingConfig(
            num_workers=cfg.num_workers,
            use_gpu=cfg.use_gpu,
            resources_per_worker={"CPU": cfg.cpus_per_worker, **({"GPU": 1} if cfg.use_gpu else {})},
        )
        torch_config = TorchConfig(backend="nccl" if cfg.use_gpu else "gloo")
        # Ray Train resumes a run by name: a run under the same storage path and name starts from its latest
        # checkpoint (a driver that was cut off, a machine that rebooted; a finished run is reused as it is).
        # The name carries a fingerprint of everything that shapes the training, so a changed config or data
        # never continues another run's checkpoint. resume=False starts this run afresh. Other runs under the
        # storage path are never touched: they may be another job's, live, on a volume both jobs share.
        if not cfg.resume and (storage / run_name).is_dir():
            log.info("removing %s: resume=false", storage / run_name)
            shutil.rmtree(storage / run_name)
        trainer = TorchTrainer(train_loop_per_worker, train_loop_config=loop_config, scaling_config=scaling,
                               torch_config=torch_config, run_config=run_config)  # fmt: skip
        result = trainer.fit()  # raises once a failure exceeds max_failures
        best = max(result.best_checkpoints, key=lambda cm: _nan_low(cm[1].get("val_kappa_cut")))
        best_ckpt, best_metrics = best
        with best_ckpt.as_directory() as d:
            if (out / "adapter").exists():
                shutil.rmtree(out / "adapter")
            shutil.copytree(Path(d) / "adapter", out / "adapter")
        with result.checkpoint.as_directory() as d:  # the latest: the whole history, not the best's prefix
            state = json.loads(Path(d, "state.json").read_text())
            history, resumed_from = state["history"], state.get("resumed_from", [])
        template = get_template(cfg.template).with_limits(cfg.max_doc_tokens, cfg.max_query_tokens)
        metrics = {
            k: v for k, v in best_metrics.items() if k.startswith("val_") or k in ("step", "train_loss")
        }
        card = JudgeCard(
            base_model=cfg.base_model, prompt_template=template.name, prompt_version=template.version,
            grades=cfg.grades, max_doc_tokens=cfg.max_doc_tokens, max_query_tokens=cfg.max_query_tokens,
            adapter="adapter", data=data_summary, metrics=metrics, cutpoints=None,
            injection_guard=cfg.injection.guard,
            training={"lora": cfg.lora.model_dump(), "deepspeed": state.get("deepspeed", cfg.deepspeed),
                      "deepspeed_reason": state.get("deepspeed_reason"), "num_workers": cfg.num_workers,
                      "epochs": cfg.epochs, "batch_size": cfg.batch_size, "lr": cfg.lr, "history": history,
                      "resumed_from_steps": resumed_from, "ray_train_run": str(storage / run_name)},
        )  # fmt: skip
        # Cut-points are tuned where they are applied: on pairs in their natural grade mix (the pool annotate
        # grades is mostly grade 0). Cut-points tuned on the class-balanced sample put too few pairs in grade 0.
        calib = natural_sample(pools[1], cfg.stack.n_pairs if cfg.stack else cfg.cutpoint_pairs, cfg.seed + 2)
        card.data["cutpoints_tuned_on"] = {"pairs": calib.num_rows, "queries": len(pc.unique(calib.column("qid"))),
                                           "sampling": "natural", "grades": _grade_hist(calib, cfg.grades)}  # fmt: skip
        card.save(out)
        num_gpus = 1 if cfg.use_gpu else 0
        if cfg.stack is not None:
            stack = cfg.stack
            if num_gpus and not stack.num_gpus:
                stack = stack.model_copy(update={"num_gpus": num_gpus})
            print(f"stacking the judge and tuning its cut-points: scoring {calib.num_rows} validation-query "
                  "pairs (natural grade mix)", flush=True)  # fmt: skip
            metrics["stack"] = stack_judge(str(out), out, calib, stack, dtype=cfg.dtype)
            cut = JudgeCard.load(
                out
            ).cutpoints  # stack_judge tuned the LLM's own cut-points on the same pairs
        else:
            print(f"tuning the judge's cut-points on {calib.num_rows} validation-query pairs (natural grade mix)",
                  flush=True)  # fmt: skip
            cut = natural_cutpoints(str(out), calib, num_gpus=num_gpus, batch_size=max(8, cfg.batch_size),
                                    dtype=cfg.dtype)  # fmt: skip
            card.cutpoints = cut
            card.save(out)
    return write_stage_files(
        out, "judge.finetune", cfg, {"train_pairs": data_summary["train_pairs"], "val_pairs": val.num_rows,
                                     **({"injected_pairs": injected} if injected else {})},
        cfg.train + (cfg.val or []), timer.seconds, {"metrics": metrics, "cutpoints": cut, "storage": str(storage)},
    )  # fmt: skip
