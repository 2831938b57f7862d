"""Use curate as a library: audit a caption table for gender–occupation skew, then rebalance it.

    python examples/fairness_with_library.py /tmp/example

Runs offline in seconds on a synthetic table where most nurses are women and most engineers
men. For image labels and retrieval bias, pass `run=` a curate run folder of the same samples.
"""

from __future__ import annotations

import hashlib
import random
import sys
from pathlib import Path

import polars as pl

from curate.balancing.metadata import load_metadata
from curate.fairness.audit import AuditOptions, audit
from curate.fairness.rebalance import RebalanceOptions, rebalance
from curate.fairness.spec import load_spec


def synthetic_table(path: Path, n: int = 3000, seed: int = 0) -> Path:
    rng = random.Random(seed)
    women = {"nurse": 0.85, "engineer": 0.2, "teacher": 0.5, "chef": 0.5}
    rows = []
    for i in range(n):
        job = rng.choice(list(women))
        person = "woman" if rng.random() < women[job] else "man"
        rows.append((hashlib.md5(str(i).encode()).hexdigest(), f"a {person} working as a {job}"))
    pl.DataFrame(rows, schema=["uid", "caption"], orient="row").write_parquet(path)
    return path


def main(workdir: Path) -> dict[str, float]:
    workdir.mkdir(parents=True, exist_ok=True)
    table = synthetic_table(workdir / "pool.parquet")
    concepts = workdir / "jobs.txt"
    concepts.write_text("nurse\nengineer\nteacher\nchef\n")
    spec = load_spec().select(["gender"])  # the built-in spec: perceived gender and age group
    report = audit(str(table), load_metadata(concepts), workdir / "audit", spec, AuditOptions())
    gender = report.attributes[0]
    for row in gender.most_skewed:
        print(
            f"{row.concept:10s} {row.group} {row.share:.0%} (95% CI {row.ci_low:.0%}–"
            f"{row.ci_high:.0%}) of {row.total:.0f} labelled"
        )
    result = rebalance(
        workdir / "audit", workdir / "fair", RebalanceOptions(eta=0.6, eps_d=0.05, seed=0)
    )
    change = result.attributes[0]
    print(
        f"association bias {change.association_before:.3f} -> {change.association_weights:.3f} "
        f"(weights), {change.association_subset:.3f} (subset of {result.kept}); {result.status}"
    )
    return {"before": change.association_before, "weights": change.association_weights}


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "curate-fairness-example"))
