"""The rebalance stage: per-sample keep weights that reduce the bias an audit measured.

Input is an audit folder (`fairness.audit`): its labels, concept ids and targets. Methods:

- ``m4``: M4's keep weights q ∈ [0, 1] with mean η under representation and association
  constraints (`fairness.m4`), for every chosen attribute at once.
- ``resample``: per concept, downsample every group to the target distribution. For concept r
  with n_rk labelled samples in group k, the largest sample with exactly the target shares has
  M_r = min_k n_rk / π_k members, so group k keeps the fraction M_r π_k / n_rk. A sample carrying
  several concepts keeps the smallest of its fractions; unlabelled samples and samples with no
  concept keep 1. Concepts where some group has no labelled sample cannot be balanced by
  downsampling: they are left as they are and listed.
- ``none``: weights of 1 (only ``--augment``).

Weights become a seeded subset (`balance.draws`): by default systematic rounding within exact
classes (same labels of the rebalanced attributes, same concepts), so each class keeps the floor
or ceiling of its expected count and the subset's bias follows the weights' even on concepts
with a handful of samples; ``draw="independent"`` keeps sample i when u_i < q_i instead. Either
is a pure function of (seed, uids, weights), independent of row order and input split. The
weights themselves go to ``weights.parquet`` for ``curate write --repeats weight``.

``--augment swap`` writes counterfactual captions (gendered terms swapped, `fairness.swap`) for
kept samples in curate rewrite's table format, so ``curate write --rewrites OUT`` adds them as
``<key>.rewrites.json`` next to the original caption.

Bias before, under the weights, and in the drawn subset is measured with the audit's own
metrics and written to ``metrics.parquet``; ``rebalance.json`` holds options and summary. The
summary's association bias is the max over concepts with at least ``min_support`` labelled
samples, and the mean over every constrained concept (one with a labelled sample), so pools of
small concepts still show what the weights and the subset did.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import polars as pl

from curate.balancing.draws import DrawRule, draw_subset
from curate.errors import InputError
from curate.fairness.audit import Pool, _share_frame, read_audit, target_shares
from curate.fairness.m4 import AttributeInput, M4Options, solve_m4
from curate.fairness.metrics import ShareTable, association_bias, representation_bias
from curate.io.uid_files import write_datacomp_npy
from curate.runtime.atomic import write_atomic, write_json_atomic
from curate.runtime.records import logged_stage

DECISIONS_TABLE = "decisions.parquet"
SUBSET_TABLE = "subset.parquet"
SUBSET_NPY = "subset.npy"
WEIGHTS_TABLE = "weights.parquet"
METRICS_TABLE = "metrics.parquet"
REWRITES_DIR = "rewrites"
COUNTERFACTUALS_TABLE = "counterfactuals.parquet"
REPORT_JSON = "rebalance.json"

Method = Literal["m4", "resample", "none"]
Augment = Literal["none", "swap"]


@dataclass(frozen=True)
class RebalanceOptions:
    method: Method = "m4"
    attributes: tuple[str, ...] = ()  # empty: the audit's first attribute
    eta: float = 0.9
    eps_r: float = 0.01
    eps_d: float = 0.05
    bound: Literal["conditional", "joint"] = "conditional"
    target: Literal["audit", "uniform", "pool"] = "audit"
    seed: int = 0
    draw: Literal["systematic", "independent"] = "systematic"
    augment: Augment = "none"
    swap_table: str | None = None  # default: the spec's table of the swapped attribute
    min_support: int | None = None  # default: the audit's

    def validate(self) -> None:
        if not 0 < self.eta <= 1:
            raise InputError(f"--eta must be in (0, 1], got {self.eta}")
        if self.eps_r < 0 or self.eps_d < 0:
            raise InputError("--eps-r and --eps-d must be >= 0")
        if self.method == "none" and self.augment == "none":
            raise InputError("--method none does nothing without --augment swap")


@dataclass
class BiasChange:
    attribute: str
    groups: list[str]
    target: list[float]
    representation_before: float
    representation_weights: float
    representation_subset: float
    association_before: float  # max over concepts with at least min_support labelled samples
    association_weights: float
    association_subset: float
    association_mean_before: float  # mean over the constrained concepts (any support)
    association_mean_weights: float
    association_mean_subset: float
    shares_before: list[float]
    shares_subset: list[float]
    concepts_measured: int  # constrained concepts with at least min_support labelled samples
    concepts_constrained: int  # concepts with a labelled sample: the ones M4 constrains
    min_support: int


@dataclass
class RebalanceReport:
    audit: str
    out: str
    method: str
    status: str  # optimal / infeasible / max_iter (m4), done (resample, none)
    message: str
    rows: int
    failed: int
    pool: int  # rows without error
    kept: int
    expected_kept: float  # Σ weights
    kept_fraction: float
    seed: int
    attributes: list[BiasChange]
    eps_r: float | None = None  # enforced (m4; relaxed when infeasible)
    eps_d: float | None = None
    unbalanced_concepts: list[str] = field(default_factory=list)  # resample: a group is empty
    counterfactuals: int | None = None
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _targets(pool: Pool, names: list[str], rule: str) -> dict[str, np.ndarray]:
    """π per attribute: the audit's, uniform, or the pool's labelled shares."""
    given = {a.name: a.target for a in pool.attributes}
    return {name: target_shares(given[name], rule, pool.labels[name]) for name in names}


def resample_weights(
    labels: np.ndarray,
    indptr: np.ndarray,
    indices: np.ndarray,
    num_concepts: int,
    target: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample keep fractions for downsampling each concept to `target`, and the mask of
    concepts that could not be balanced (a group has no labelled sample)."""
    k = len(target)
    n = len(labels)
    rows = np.repeat(np.arange(n), np.diff(indptr))
    row_labels = labels[rows]
    labelled = row_labels >= 0
    cells = np.bincount(
        indices[labelled] * k + row_labels[labelled], minlength=num_concepts * k
    ).reshape(num_concepts, k)
    present = cells.sum(axis=1) > 0
    unbalanced = present & (cells.min(axis=1) == 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        size = np.min(cells / target, axis=1)  # M_r
        fraction = np.where(cells > 0, size[:, None] * target / cells, 1.0)
    fraction[unbalanced] = 1.0
    fraction = np.clip(fraction, 0.0, 1.0)
    weights = np.ones(n, dtype=np.float64)
    if labelled.any():
        per_match = fraction[indices[labelled], row_labels[labelled]]
        np.minimum.at(weights, rows[labelled], per_match)
    return weights, unbalanced


def _tables(
    pool: Pool, name: str, groups: int, target: np.ndarray, weights: np.ndarray | None
) -> tuple[ShareTable, ShareTable]:
    labels = pool.labels[name]
    return (
        representation_bias(labels, groups, target, weights),
        association_bias(
            labels,
            pool.concept_indptr,
            pool.concept_indices,
            len(pool.concepts),
            groups,
            target,
            weights,
        ),
    )


def _max_supported(table: ShareTable, support: np.ndarray) -> float:
    values = np.where(support, np.nan_to_num(table.bias, nan=-1.0), -1.0)
    return float(values.max()) if support.any() else float("nan")


def _mean_over(table: ShareTable, concepts: np.ndarray) -> float:
    """Mean concept bias over `concepts` that still hold a labelled sample (NaN if none)."""
    chosen = concepts & (np.nan_to_num(table.totals) > 0)
    return float(table.bias[chosen].mean()) if chosen.any() else float("nan")


@logged_stage("rebalance")
def rebalance(audit_dir: Path, out: Path, options: RebalanceOptions) -> RebalanceReport:
    """Weights, the seeded subset, counterfactual captions and before/after bias."""
    start = time.perf_counter()
    options.validate()
    record, pool = read_audit(audit_dir)
    all_names = [a.name for a in pool.attributes]
    names = list(options.attributes) or all_names[:1]
    for name in names:
        if name not in all_names:
            raise InputError(
                f"attribute {name!r} is not in the audit (it has: {', '.join(all_names)})"
            )
    if options.method == "resample" and len(names) != 1:
        raise InputError("--method resample balances one attribute; name it with --attribute")
    targets = _targets(pool, names, options.target)
    groups = {a.name: a.groups for a in pool.attributes}
    min_support = options.min_support or int(record["options"].get("min_support", 20))
    n = pool.frame.height
    ok = pool.ok
    status, message = "done", ""
    eps_r = eps_d = None
    unbalanced: list[str] = []
    weights = np.where(ok, 1.0, 0.0)

    if options.method == "m4":
        rows = np.flatnonzero(ok)
        inputs = [
            AttributeInput(name, pool.labels[name][rows], targets[name], tuple(groups[name]))
            for name in names
        ]
        sub_indptr = np.concatenate([[0], np.cumsum(np.diff(pool.concept_indptr)[rows])]).astype(
            np.int64
        )
        result = solve_m4(
            inputs,
            sub_indptr,
            pool.concept_indices,  # failed rows carry no concepts, so the ok rows' ids in order
            len(pool.concepts),
            M4Options(
                eta=options.eta, eps_r=options.eps_r, eps_d=options.eps_d, bound=options.bound
            ),
        )
        weights = np.zeros(n, dtype=np.float64)
        weights[rows] = result.weights
        status, message = result.status, result.message
        eps_r, eps_d = result.eps_r, result.eps_d
    elif options.method == "resample":
        name = names[0]
        factors, bad = resample_weights(
            pool.labels[name],
            pool.concept_indptr,
            pool.concept_indices,
            len(pool.concepts),
            targets[name],
        )
        weights = np.where(ok, factors, 0.0)
        unbalanced = [pool.concepts[r] for r in np.flatnonzero(bad)]
        message = (
            f"{len(unbalanced)} concepts left as they are: a group has no labelled sample"
            if unbalanced
            else "every concept with labelled samples downsampled to the target"
        )

    kept = draw_subset(
        weights,
        pool.frame["uid"].to_arrow(),
        ok,
        options.seed,
        DrawRule(options.draw),
        pool.concept_indptr,
        pool.concept_indices,
        [pool.labels[name] for name in names],
    )

    changes = []
    metric_frames = []
    for name in names:
        k = len(groups[name])
        before = _tables(pool, name, k, targets[name], None)
        weighted = _tables(pool, name, k, targets[name], weights)
        subset = _tables(pool, name, k, targets[name], kept.astype(np.float64))
        constrained = np.nan_to_num(before[1].totals) > 0
        support = constrained & (np.nan_to_num(before[1].totals) >= min_support)
        for stage, (rep, assoc) in (("before", before), ("weights", weighted), ("subset", subset)):
            metric_frames.append(
                _share_frame(name, groups[name], rep, None)
                .with_columns(
                    pl.lit(None, dtype=pl.Int32).alias("concept_id"),
                    pl.lit(None, dtype=pl.String).alias("concept"),
                )
                .select(_METRIC_COLUMNS)
                .with_columns(pl.lit(stage).alias("stage"))
            )
            metric_frames.append(
                _share_frame(name, groups[name], assoc, pool.concepts)
                .select(_METRIC_COLUMNS)
                .with_columns(pl.lit(stage).alias("stage"))
            )
        changes.append(
            BiasChange(
                attribute=name,
                groups=groups[name],
                target=targets[name].tolist(),
                representation_before=float(before[0].max_bias),
                representation_weights=float(weighted[0].max_bias),
                representation_subset=float(subset[0].max_bias),
                association_before=_max_supported(before[1], support),
                association_weights=_max_supported(weighted[1], support),
                association_subset=_max_supported(subset[1], support),
                association_mean_before=_mean_over(before[1], constrained),
                association_mean_weights=_mean_over(weighted[1], constrained),
                association_mean_subset=_mean_over(subset[1], constrained),
                shares_before=[float(x) for x in before[0].shares[0]],
                shares_subset=[float(x) for x in subset[0].shares[0]],
                concepts_measured=int(support.sum()),
                concepts_constrained=int(constrained.sum()),
                min_support=min_support,
            )
        )

    errors = pool.frame["error"]
    status_col = np.where(kept, "kept", np.where(ok, "dropped", "failed"))
    reason = [
        err if err is not None else ("not_sampled" if s == "dropped" else None)
        for err, s in zip(errors.to_list(), status_col.tolist(), strict=True)
    ]
    decisions = pl.DataFrame(
        {
            "uid": pool.frame["uid"],
            "shard": pool.frame["shard"],
            "key": pool.frame["key"],
            "status": status_col.tolist(),
            "reason": pl.Series(reason, dtype=pl.String),
            "weight": np.where(ok, weights, np.nan),
        }
    ).with_columns(pl.col("weight").fill_nan(None))
    subset_table = decisions.filter(pl.col("status") == "kept").select(
        "uid", "shard", "key", "weight"
    )
    weight_table = decisions.filter(pl.col("status") != "failed").select(
        "uid", "shard", "key", "weight"
    )

    counterfactuals = None
    out.mkdir(parents=True, exist_ok=True)
    if options.augment == "swap":
        frame = _counterfactuals(pool, kept, options.swap_table)
        counterfactuals = frame.height
        (out / REWRITES_DIR).mkdir(exist_ok=True)
        write_atomic(
            out / REWRITES_DIR / COUNTERFACTUALS_TABLE, lambda tmp: frame.write_parquet(tmp)
        )

    write_atomic(out / DECISIONS_TABLE, lambda tmp: decisions.write_parquet(tmp))
    write_atomic(out / SUBSET_TABLE, lambda tmp: subset_table.write_parquet(tmp))
    write_atomic(out / WEIGHTS_TABLE, lambda tmp: weight_table.write_parquet(tmp))
    write_datacomp_npy(out / SUBSET_NPY, subset_table["uid"].to_arrow())
    write_atomic(out / METRICS_TABLE, lambda tmp: pl.concat(metric_frames).write_parquet(tmp))
    report = RebalanceReport(
        audit=str(audit_dir),
        out=str(out),
        method=options.method,
        status=status,
        message=message,
        rows=n,
        failed=int((~ok).sum()),
        pool=int(ok.sum()),
        kept=int(kept.sum()),
        expected_kept=float(weights[ok].sum()),
        kept_fraction=float(kept.sum() / max(1, ok.sum())),
        seed=options.seed,
        attributes=changes,
        eps_r=eps_r,
        eps_d=eps_d,
        unbalanced_concepts=unbalanced,
        counterfactuals=counterfactuals,
    )
    report.seconds = time.perf_counter() - start
    write_json_atomic(
        out / REPORT_JSON,
        {
            "options": asdict(options),
            "targets": {k: v.tolist() for k, v in targets.items()},
            "report": {k: v for k, v in report.to_json().items() if k != "seconds"},
        },
    )
    return report


_METRIC_COLUMNS = [
    "attribute",
    "concept_id",
    "concept",
    "group",
    "count",
    "total",
    "share",
    "target",
    "diff",
    "ci_low",
    "ci_high",
    "bias",
]


def _counterfactuals(pool: Pool, kept: np.ndarray, table_path: str | None) -> pl.DataFrame:
    """Swapped captions of kept samples, in curate rewrite's table format."""
    from curate.fairness.swap import load_swap_table, swap_many

    if table_path is not None:
        table = load_swap_table(table_path)
    else:
        with_swap = [a for a in pool.attributes if a.swap]
        if not with_swap:
            raise InputError(
                "--augment swap: no attribute in the spec names a swap table; "
                "give --swap-table FILE"
            )
        table = load_swap_table(with_swap[0].swap)

    rows = np.flatnonzero(kept)
    captions = pool.frame["caption"].gather(rows).to_list()
    swapped = swap_many(captions, table)
    keep = [i for i, s in enumerate(swapped) if s is not None]
    model = f"counterfactual-swap:{table.version}"
    return pl.DataFrame(
        {
            "uid": [pool.frame["uid"][int(rows[i])] for i in keep],
            "caption": [captions[i] for i in keep],
            "rewrites": [[swapped[i]] for i in keep],
            "reasons": [[None] for _ in keep],
            "status": ["ok"] * len(keep),
            "error": [None] * len(keep),
            "backend": ["swap"] * len(keep),
            "model": [model] * len(keep),
            "prompt_version": [table.version] * len(keep),
        },
        schema={
            "uid": pl.String,
            "caption": pl.String,
            "rewrites": pl.List(pl.String),
            "reasons": pl.List(pl.String),
            "status": pl.String,
            "error": pl.String,
            "backend": pl.String,
            "model": pl.String,
            "prompt_version": pl.String,
        },
    )
