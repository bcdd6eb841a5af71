"""``augrel judge diff A B --pairs PATH --out DIR``: two judges on the same pairs, compared (eval.judge_diff).

A and B are each a judge (a judge directory, or a base model used zero-shot) or a judgments table already
written (a directory of part-*.parquet without judge_card.json). A judge grades the pairs in this process
(small sets; `augrel annotate` is the distributed path) and its judgments stay in OUT/a or OUT/b: a rerun with
the same judge and pairs reuses them. Writes OUT/diff.json and OUT/diff.html; with ``record`` (default on when
B is a judge directory) B's judge card keeps the summary under ``audit["diffs"]``, one entry per A, so the
report shows how far each version moved from the last.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from pipelines import tables as T
from pipelines.errors import ConfigError, DataError
from pipelines.io import PART_GLOB, read_table, write_table
from pipelines.judge import judge_pairs, read_pairs
from pipelines.stage import StageConfig, StageResult, Timer, read_manifest, write_stage_files

log = logging.getLogger("augrel")

SIDES = ("a", "b")


class JudgeDiffConfig(StageConfig):
    """``augrel judge diff``: which two judges (or judgments tables), which pairs, where the comparison goes."""

    a: str = Field(description="judge A: a judge directory, a base model (zero-shot), or a judgments table")
    b: str = Field(description="judge B: the same kinds as A (usually the newer judge)")
    pairs: str | None = Field(
        None,
        description="pairs table both judges grade (needed when A or B is a judge; with two judgments tables "
        "it adds query and passage texts and the human grades)",
    )
    out: str = Field(description="output directory: diff.json, diff.html, a/ and b/ (the judgments)")
    record: bool | None = Field(
        None, description="write the summary into B's judge card (default: when B is a judge directory)"
    )
    top: int = Field(20, ge=0, description="how many of the most-moved pairs to list")
    bootstrap: int = Field(1000, ge=0, description="bootstrap resamples over queries for the 95% intervals")
    seed: int = 0
    template_a: str = Field("umbrela-v1", description="prompt template when A is a base model")
    template_b: str = Field("umbrela-v1", description="prompt template when B is a base model")
    max_doc_tokens: int = Field(256, gt=0, description="passage truncation for a base model")
    batch_size: int = Field(16, gt=0)
    dtype: str = Field("auto", pattern="^(auto|bf16|fp16|fp32)$")
    device: str = "auto"
    limit: int | None = Field(None, gt=0, description="compare on the first N pairs only")
    chunk_size: int = Field(256, gt=0, description="pairs per progress step")


def side_kind(spec: str, name: str) -> str:
    """``judge_dir``, ``judgments`` or ``model`` (a base model id or path, loaded zero-shot)."""
    from models.judge_card import is_judge_dir

    p = Path(spec)
    if is_judge_dir(p):
        return "judge_dir"
    if p.is_dir():
        if any(p.glob(PART_GLOB)):
            return "judgments"
        if (p / "config.json").exists():  # a transformers checkpoint directory
            return "model"
        raise ConfigError(
            f"{name}: {spec} is a directory with neither judge_card.json (a judge) nor part-*.parquet "
            "(a judgments table) nor config.json (a model)"
        )
    if p.exists():
        raise ConfigError(f"{name}: {spec} is a file; give a judge directory, a model or a judgments table "
                          "directory")  # fmt: skip
    # a hub id is owner/name; a missing path (say a typo under runs/) must not be sent to the hub as one
    looks_local = spec.startswith((".", "/", "~")) or spec.count("/") > 1 or "\\" in spec
    if looks_local or (p.parent != Path(".") and p.parent.is_dir()):
        raise ConfigError(f"{name}: {spec}: no such judge directory, judgments table or model path")
    return "model"  # a hub id or the offline alias


def _judge_identity(spec: str, kind: str, template: str, cfg: JudgeDiffConfig) -> dict[str, Any]:
    """What decides a judge's grades, read without loading it, so a rerun can tell its judgments are current.
    The card's audit is left out: recording a diff must not make the next run re-judge."""
    if kind == "judge_dir":
        card = json.loads((Path(spec) / "judge_card.json").read_text())
        card.pop("audit", None)
        files = []
        for name in filter(None, (card.get("adapter"), card.get("combiner"))):
            p = Path(spec) / name
            for f in sorted(p.rglob("*")) if p.is_dir() else [p]:
                if f.is_file():
                    st = f.stat()
                    files.append([str(f.relative_to(spec)), st.st_size, st.st_mtime_ns])
        return {"judge": str(Path(spec).resolve()), "card": card, "files": files, "dtype": cfg.dtype}
    return {"judge": spec, "template": template, "max_doc_tokens": cfg.max_doc_tokens, "dtype": cfg.dtype}


def _pairs_fingerprint(pairs: pa.Table) -> str:
    cols = [c for c in ("qid", "docid", "query", "text", "title", "url") if c in pairs.column_names]
    h = hashlib.sha256()
    for c in cols:
        for v in pairs.column(c).to_pylist():
            h.update(b"\1" if v is None else b"\0" + v.encode())
        h.update(b"\2")
    return h.hexdigest()


def _score(
    spec: str, template: str, pairs: pa.Table, cfg: JudgeDiffConfig, desc: str
) -> tuple[pa.Table, dict]:
    from models.judge_card import load_judge

    t0 = time.perf_counter()
    judge = load_judge(spec, template=template, max_doc_tokens=cfg.max_doc_tokens, dtype=cfg.dtype,
                       device=cfg.device)  # fmt: skip
    load_s = time.perf_counter() - t0
    scorer = judge.scorer(cfg.batch_size)
    t0 = time.perf_counter()
    table = judge_pairs(judge, scorer, pairs, cfg.chunk_size, desc) if pairs.num_rows else None
    score_s = time.perf_counter() - t0
    info = {"judge_card": asdict(judge.card), "model_load_s": round(load_s, 2),
            "pairs_per_s": round(pairs.num_rows / score_s, 3) if score_s > 0 else None}  # fmt: skip
    del judge, scorer
    gc.collect()  # one judge's weights go before the next one loads
    if table is None:
        raise DataError(f"{cfg.pairs}: no pairs left to judge")
    return table, info


def _judgments(name: str, spec: str, kind: str, template: str, pairs: pa.Table | None, pairs_fp: str | None,
               cfg: JudgeDiffConfig, out: Path) -> tuple[pa.Table, str, dict]:  # fmt: skip
    """One side's judgments table, its display name, and how it was obtained."""
    if kind == "judgments":
        try:
            table = T.conform(T.JUDGMENTS, read_table(spec), spec)
        except T.SchemaError as e:
            raise DataError(f"{name}: {spec}: not a judgments table: {e}") from None
        judges = sorted(set(pc.unique(table.column("judge")).to_pylist()))
        return table, f"{spec} ({', '.join(judges)})", {"source": "judgments table", "path": spec}
    if pairs is None:
        raise ConfigError(f"pairs: {name} ({spec}) is a judge, so it needs --pairs to grade")
    identity = {**_judge_identity(spec, kind, template, cfg), "pairs": pairs_fp}
    side_dir = out / name
    manifest = read_manifest(side_dir)
    if manifest and manifest.get("identity") == identity and any(side_dir.glob(PART_GLOB)):
        log.info("%s: reusing the judgments in %s (same judge and pairs)", name, side_dir)
        table = T.conform(T.JUDGMENTS, read_table(side_dir), str(side_dir))
        return table, spec, {"source": "reused", "path": str(side_dir)}
    table, info = _score(spec, template, pairs, cfg, f"judging {name.upper()}")
    write_table(side_dir, table)
    write_stage_files(side_dir, "judge.diff.judge", cfg, {"judged": table.num_rows}, [spec, cfg.pairs or ""],
                      0.0, {"table": "judgments", "identity": identity, **info})  # fmt: skip
    return table, spec, {"source": "judged", "path": str(side_dir), "pairs_per_s": info["pairs_per_s"]}


def _grades_of(spec: str, kind: str) -> list[int] | None:
    if kind != "judge_dir":
        return None
    return list(json.loads((Path(spec) / "judge_card.json").read_text()).get("grades") or T.DEFAULT_GRADES)


def record_audit(judge_dir: str | Path, entry: dict[str, Any]) -> Path:
    """Keep ``entry`` in the card's ``audit["diffs"]``, replacing an earlier diff against the same A."""
    from models.judge_card import JudgeCard

    card = JudgeCard.load(judge_dir)
    diffs = [d for d in card.audit.get("diffs", []) if d.get("against") != entry["against"]]
    card.audit = {**card.audit, "diffs": [*diffs, entry]}
    return card.save(judge_dir)


def run(cfg: JudgeDiffConfig) -> StageResult:
    from eval.judge_diff import align, audit_entry, diff_judges, render_html

    out = Path(cfg.out)
    with Timer() as timer:
        kinds = {"a": side_kind(cfg.a, "a"), "b": side_kind(cfg.b, "b")}
        record = cfg.record if cfg.record is not None else kinds["b"] == "judge_dir"
        if record and kinds["b"] != "judge_dir":
            raise ConfigError(f"record: b ({cfg.b}) is not a judge directory, so it has no card to record in")
        grades = {s: _grades_of(spec, kinds[s]) for s, spec in (("a", cfg.a), ("b", cfg.b))}
        known = [g for g in grades.values() if g]
        if len(known) == 2 and known[0] != known[1]:
            raise ConfigError(f"a and b grade on different scales: {known[0]} vs {known[1]}")
        scale = known[0] if known else list(T.DEFAULT_GRADES)

        pairs = rejected = pairs_fp = None
        if cfg.pairs:
            pairs, rejected = read_pairs(cfg.pairs, cfg.limit)
            if rejected.num_rows:
                write_table(out / "rejected", rejected)
                log.warning("%s: %d pair(s) rejected -> %s", cfg.pairs, rejected.num_rows, out / "rejected")
            pairs_fp = _pairs_fingerprint(pairs)
        tables, names, sources = {}, {}, {}
        for s, spec, template in (("a", cfg.a, cfg.template_a), ("b", cfg.b, cfg.template_b)):
            tables[s], names[s], sources[s] = _judgments(
                s, spec, kinds[s], template, pairs, pairs_fp, cfg, out
            )

        def keys(t: pa.Table) -> list[tuple[str, str]]:
            return list(zip(t.column("qid").to_pylist(), t.column("docid").to_pylist(), strict=True))

        ia, ib, dropped = align(keys(tables["a"]), keys(tables["b"]))
        if len(ia) == 0:
            raise DataError(f"a ({cfg.a}) and b ({cfg.b}) judged no (qid, docid) pair in common")
        for k, v in dropped.items():
            if v:
                log.warning("%s: %d pair(s) left out of the comparison", k.replace("_", " "), v)
        ta, tb = tables["a"].take(pa.array(ia)), tables["b"].take(pa.array(ib))
        query = text = human = None
        without_text = 0
        if pairs is not None:
            at = {k: i for i, k in enumerate(keys(pairs))}
            rows = [at.get(k) for k in keys(ta)]
            without_text = sum(r is None for r in rows)

            def column(name: str) -> list:
                values = pairs.column(name).to_pylist()
                return [values[r] if r is not None else None for r in rows]

            query, text = column("query"), column("text")
            human = column("label") if pairs.column("label").null_count < pairs.num_rows else None
        try:
            diff = diff_judges(
                ta.column("qid").to_pylist(), ta.column("docid").to_pylist(),
                ta.column("label").to_numpy(), ta.column("score").to_numpy(),
                tb.column("label").to_numpy(), tb.column("score").to_numpy(),
                grades=scale, human=human, query=query, text=text, top=cfg.top, n_boot=cfg.bootstrap,
                seed=cfg.seed, dropped=dropped,
            )  # fmt: skip
        except ValueError as e:  # label_a / label_b / human: a grade off the judges' scale
            raise DataError(f"{e} (label_a: a = {cfg.a}; label_b: b = {cfg.b}; human: {cfg.pairs})") from None
        diff["a"] = {"spec": cfg.a, "kind": kinds["a"], "name": names["a"], **sources["a"]}
        diff["b"] = {"spec": cfg.b, "kind": kinds["b"], "name": names["b"], **sources["b"]}
        diff["pairs_rejected"] = rejected.num_rows if rejected is not None else 0
        diff["judged_pairs_not_in_pairs_table"] = without_text
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / "diff.json.tmp"
        tmp.write_text(json.dumps(diff, indent=2, default=float) + "\n")
        tmp.replace(out / "diff.json")
        (out / "diff.html").write_text(render_html(diff, names["a"], names["b"]))
        recorded = None
        if record:
            entry = audit_entry(diff, cfg.a, time.strftime("%Y-%m-%dT%H:%M:%S%z"))
            recorded = str(record_audit(cfg.b, entry))
    counts = {"pairs": diff["pairs"], "queries": diff["queries"], "changed": diff["changed"]["pairs"],
              "left_out": int(sum(dropped.values()))}  # fmt: skip
    return write_stage_files(
        out, "judge.diff", cfg, counts, [cfg.a, cfg.b, *([cfg.pairs] if cfg.pairs else [])], timer.seconds,
        {"agreement": diff["agreement"], "ci95": diff["ci95"], "human": diff["human"], "recorded": recorded,
         "sides": {"a": diff["a"], "b": diff["b"]}},
    )  # fmt: skip
