"""``augrel run``'s pool stage: which candidate pairs the judge labels, and which pairs rankers train on.

    candidates (every query, label = human grade or null) + splits
        -> OUT/unlabelled/part-*.parquet  candidate pairs with no human label, of queries outside the held-out
                                          splits (train, val, unlabelled queries): what the judge annotates
        -> OUT/human/part-*.parquet       the human-labelled pairs of the same queries (their splits' pairs)

Held-out queries (``hold_out``, by default the test split) are left out of both, so no test query's pairs are
judged into a ranker's training labels: rankers trained on ``OUT/*/part-*.parquet`` are scored on queries
that trained nothing. Both tables carry the pairs columns only (with title), so one glob reads them as one.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import Field

from pipelines import tables as T
from pipelines.errors import DataError
from pipelines.io import expand_paths, read_table, write_table
from pipelines.stage import StageConfig, StageResult, Timer, write_stage_files

#: the columns both output tables share, in order
POOL_SCHEMA = T.PAIRS.schema(["title"])


class PoolConfig(StageConfig):
    """Candidates + query splits -> the pairs to judge and the human-labelled pairs beside them."""

    candidates: str = Field(description="candidate pairs (augrel candidates)")
    splits: str = Field(description="the split stage's directory (splits/ table + one directory per split)")
    out: str = Field(description="output directory: unlabelled/ and human/ pairs tables")
    hold_out: list[str] = Field(
        default_factory=lambda: ["test"], description="splits whose queries are neither judged nor trained on"
    )
    human_splits: list[str] = Field(
        default_factory=lambda: ["train", "val"],
        description="splits whose human-labelled pairs rankers train on",
    )


def _as_pool(table: pa.Table) -> pa.Table:
    t = T.conform(T.PAIRS, table)
    if "title" not in t.column_names:
        t = t.append_column("title", pa.nulls(t.num_rows, pa.string()))
    return t.select(POOL_SCHEMA.names).cast(POOL_SCHEMA)


def pair_keys(table: pa.Table) -> pa.Array:
    """One string per (qid, docid), for set membership on two columns."""
    return pc.binary_join_element_wise(table.column("qid"), table.column("docid"), "\x1f")


def unlabelled_outside(batch: pa.Table, held_out: pa.Array, labelled: pa.Array) -> pa.Table:
    """The batch's pairs with no human label whose query is not held out, as pool rows. A pair the human splits
    label is left out even where the candidate row lacks its label (candidates made without --qrels): it would
    otherwise be judged and sit in the rankers' table twice, with two labels."""
    keep = pc.and_(
        pc.is_null(batch.column("label")), pc.invert(pc.is_in(batch.column("qid"), value_set=held_out))
    )
    keep = pc.and_(keep, pc.invert(pc.is_in(pair_keys(batch), value_set=labelled)))
    return _as_pool(batch.filter(keep))


def pool_dataset(cfg: PoolConfig, held_out: pa.Array, labelled: pa.Array):
    """The lazy Ray Data transform: candidate files -> the unlabelled pairs of queries that are not held out."""
    import ray

    files = [str(f) for f in expand_paths(cfg.candidates)]
    return ray.data.read_parquet(files, num_cpus=0.1).map_batches(
        unlabelled_outside, batch_format="pyarrow", fn_kwargs={"held_out": held_out, "labelled": labelled},
        num_cpus=0.5,
    )  # fmt: skip


def run(cfg: PoolConfig) -> StageResult:
    from cluster.embedded import init_ray
    from pipelines.io import write_dataset

    out, splits_dir = Path(cfg.out), Path(cfg.splits)
    with Timer() as timer:
        assignment = read_table(splits_dir / "splits")
        # a split is known by its directory: one with no query (a zero fraction) still has its (empty) tables
        known = {d.name for d in splits_dir.iterdir() if (d / "pairs").is_dir()}
        unknown = sorted(set(cfg.hold_out + cfg.human_splits) - known)
        if unknown:
            raise DataError(f"{cfg.splits}: no split(s) {unknown} (splits: {sorted(known)})")
        if set(cfg.hold_out) & set(cfg.human_splits):
            raise DataError(
                f"hold_out and human_splits share {sorted(set(cfg.hold_out) & set(cfg.human_splits))}"
            )
        held = assignment.filter(pc.is_in(assignment.column("split"), value_set=pa.array(cfg.hold_out)))
        held_out = held.column("qid").combine_chunks()
        human = pa.concat_tables([_as_pool(read_table(splits_dir / s / "pairs")) for s in cfg.human_splits])
        human_t = human.filter(pc.is_valid(human.column("label")))
        init_ray()
        n_unlabelled = write_dataset(pool_dataset(cfg, held_out, pair_keys(human_t).combine_chunks()),
                                     out / "unlabelled")  # fmt: skip
        write_table(out / "human", human_t)
        qids = set()
        for f in sorted((out / "unlabelled").glob("part-*.parquet")):
            qids.update(pc.unique(pq.read_table(f, columns=["qid"]).column("qid")).to_pylist())
    counts = {"unlabelled_pairs": n_unlabelled, "unlabelled_pairs_queries": len(qids),
              "human_pairs": human_t.num_rows, "human_queries": len(pc.unique(human_t.column("qid"))),
              "held_out_queries": len(held_out)}  # fmt: skip
    return write_stage_files(out, "pool", cfg, counts, [cfg.candidates, cfg.splits], timer.seconds,
                             {"hold_out": cfg.hold_out, "human_splits": cfg.human_splits,
                              "tables": {"unlabelled": "pairs to judge", "human": "human-labelled pairs"}})  # fmt: skip
