"""LambdaMART ranker: LightGBM ``lambdarank`` over the pair features (no Ray here).

Rows are grouped by query (LightGBM needs each query's rows contiguous and the group sizes); a query with one
document or without a relevant one stays in training (it contributes no pairwise gradient, which LightGBM
allows) and is left out of the metrics by ``eval.ranking``'s rule. Early stopping watches NDCG@10 on a validation
set when one is given. The artifact is a directory: ``model.txt`` (LightGBM's own format) and ``ranker.json``
(feature names in order, parameters, best iteration, label source), so it loads without the training config.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class RankerParams:
    num_leaves: int = 15
    learning_rate: float = 0.05
    n_estimators: int = 400
    min_data_in_leaf: int = 20
    feature_fraction: float = 0.9
    bagging_fraction: float = 0.9
    bagging_freq: int = 1
    lambda_l2: float = 1.0
    early_stopping_rounds: int = 50
    eval_at: tuple[int, ...] = (10,)
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def lgb_params(self) -> dict[str, Any]:
        return {
            "objective": "lambdarank",
            "metric": "ndcg",
            "ndcg_eval_at": list(self.eval_at),
            "num_leaves": self.num_leaves,
            "learning_rate": self.learning_rate,
            "min_data_in_leaf": self.min_data_in_leaf,
            "feature_fraction": self.feature_fraction,
            "bagging_fraction": self.bagging_fraction,
            "bagging_freq": self.bagging_freq,
            "lambda_l2": self.lambda_l2,
            "seed": self.seed,
            "deterministic": True,
            "num_threads": 0,
            "verbose": -1,
            **self.extra,
        }


def group_by_query(qids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(order that makes each query's rows contiguous, group sizes in that order); stable within a query."""
    qids = np.asarray(qids, dtype=object)
    _, first, inverse = np.unique(qids, return_index=True, return_inverse=True)
    # queries in order of first appearance, rows in input order within each query
    rank_of_query = np.argsort(np.argsort(first))
    order = np.lexsort((np.arange(len(qids)), rank_of_query[inverse]))
    sizes = np.bincount(rank_of_query[inverse])
    return order, sizes[sizes > 0]


class LambdaMARTRanker:
    """LightGBM lambdarank over a fixed, named feature list."""

    def __init__(self, features: Sequence[str], params: RankerParams | None = None):
        self.features = list(features)
        self.params = params or RankerParams()
        self.booster = None
        self.info: dict[str, Any] = {}

    def _dataset(self, X, y, qids, reference=None):
        import lightgbm as lgb

        X, y = np.asarray(X, dtype=np.float32), np.asarray(y)
        if X.ndim != 2 or X.shape[1] != len(self.features):
            raise ValueError(
                f"expected {len(self.features)} feature columns {self.features}, got shape {X.shape}"
            )
        if len(y) != len(X) or len(qids) != len(X):
            raise ValueError(f"{len(X)} rows but {len(y)} labels and {len(qids)} qids")
        if len(y) and (np.any(y < 0) or not np.all(np.equal(np.mod(y, 1), 0))):
            raise ValueError("labels must be non-negative integer grades")
        order, sizes = group_by_query(qids)
        return lgb.Dataset(X[order], label=y[order].astype(np.int32), group=sizes, feature_name=self.features,
                           reference=reference, free_raw_data=False)  # fmt: skip

    def fit(self, X, y, qids, X_val=None, y_val=None, qids_val=None, init_from: LambdaMARTRanker | None = None,
            n_estimators: int | None = None) -> LambdaMARTRanker:  # fmt: skip
        """Train; with a validation set, stop when its NDCG@10 has not improved for ``early_stopping_rounds``.

        ``init_from`` continues boosting from another ranker's trees up to its best iteration (the curriculum:
        judge labels, then humans); trees past it are the ones early stopping judged to overfit.
        """
        import lightgbm as lgb

        train = self._dataset(X, y, qids)
        init_model = init_from.best_booster() if init_from is not None else None
        valid, callbacks = [], [lgb.log_evaluation(period=0)]
        if X_val is not None and len(X_val):
            valid = [self._dataset(X_val, y_val, qids_val, reference=train)]
            callbacks.append(lgb.early_stopping(self.params.early_stopping_rounds, verbose=False))
        self.booster = lgb.train(
            self.params.lgb_params(), train, num_boost_round=n_estimators or self.params.n_estimators,
            valid_sets=valid, valid_names=["val"] * len(valid), callbacks=callbacks,
            init_model=init_model,
        )  # fmt: skip
        best = self.booster.best_iteration or self.booster.current_iteration()
        self.info = {"best_iteration": int(best), "train_rows": len(y), "train_queries": len(set(qids)),
                     "init_iterations": init_model.current_iteration() if init_model is not None else 0,
                     "best_val_score": {k: float(v) for k, v in (self.booster.best_score.get("val") or {}).items()}}  # fmt: skip
        return self

    def best_booster(self):
        """The booster cut at the best iteration. LightGBM already drops the trees past it when ``lgb.train``
        returns (it reloads ``model_to_string()``, which saves up to the best iteration), but only with its
        default ``keep_training_booster=False``: the cut is explicit here so a continued model never builds on
        trees early stopping rejected."""
        import lightgbm as lgb

        if self.booster is None:
            raise RuntimeError("ranker is not trained")
        best = self.info.get("best_iteration") or self.booster.current_iteration()
        if best >= self.booster.current_iteration():
            return self.booster
        return lgb.Booster(model_str=self.booster.model_to_string(num_iteration=best))

    def predict(self, X) -> np.ndarray:
        if self.booster is None:
            raise RuntimeError("ranker is not trained")
        X = np.asarray(X, dtype=np.float32)
        return self.booster.predict(X, num_iteration=self.info.get("best_iteration") or None).astype(
            np.float32
        )

    def importances(self) -> dict[str, float]:
        """Total gain per feature, normalised to sum to 1."""
        gain = self.booster.feature_importance(importance_type="gain")
        total = float(gain.sum()) or 1.0
        return {f: float(g) / total for f, g in zip(self.features, gain, strict=True)}

    def save(self, path: str | Path, **meta: Any) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.booster.save_model(str(path / "model.txt"))
        (path / "ranker.json").write_text(json.dumps({"features": self.features, "params": asdict(self.params),
                                                      "info": self.info, **meta}, indent=2) + "\n")  # fmt: skip
        return path

    @classmethod
    def load(cls, path: str | Path) -> LambdaMARTRanker:
        import lightgbm as lgb

        path = Path(path)
        meta = json.loads((path / "ranker.json").read_text())
        params = meta["params"]
        params["eval_at"] = tuple(params["eval_at"])
        ranker = cls(meta["features"], RankerParams(**params))
        ranker.booster = lgb.Booster(model_file=str(path / "model.txt"))
        ranker.info = meta.get("info", {})
        return ranker
