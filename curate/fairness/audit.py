"""The audit stage: who the pool shows, and with which concepts.

1. ``match`` (map, per unit, resumable): the concept list is matched against every caption by the
   balance stage's match phase (`balance.stage.match_units`), so concept files, modes, workers,
   tasks and resume work exactly as for ``curate balance``: ``OUT/matches/<unit>.parquet``.
2. ``label`` (reduce): uids are checked as everywhere (bad and repeated uids fail), captions get
   attribute labels from the spec's terms (`fairness.lexicon`), and, when a run folder with image
   embeddings is given, images get zero-shot labels from the run's own model
   (`fairness.zeroshot`). Per attribute the combined label is the caption's (it names one group,
   or several: ``mixed``) and otherwise the image's confident label, on samples that show a
   person; the source of every label is recorded.
3. ``measure``: representation and association bias per attribute with Wilson intervals
   (`fairness.metrics`), and, with embeddings, retrieval MaxSkew@k / NDKL for one neutral prompt
   per concept over the pool's labelled images.

Outputs: ``labels.parquet`` (one row per input row: uid, shard, key, caption, error, person
flags, per attribute the caption/image/combined label, confidence and source, concept ids),
``representation.parquet``, ``association.parquet``, ``retrieval.parquet`` (with embeddings),
``concepts.json`` and ``audit.json`` (options, resolved spec, summary). `curate rebalance` reads
the folder.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import polars as pl
import pyarrow as pa

from curate.balancing.matching import MatchMode
from curate.balancing.metadata import Metadata
from curate.balancing.stage import (
    match_units,
    matches_csr,
    pool_errors,
    raise_empty,
    read_matches,
)
from curate.errors import InputError, failure_code
from curate.fairness.lexicon import MIXED, caption_labels, caption_mentions_person
from curate.fairness.metrics import (
    ShareTable,
    association_bias,
    representation_bias,
    retrieval_bias,
    smoothed_shares,
    top_k_labels,
)
from curate.fairness.spec import Attribute, AttributeSpec
from curate.fairness.zeroshot import class_probabilities, confident_labels, prompt_ensembles
from curate.io.captions import resolve_units
from curate.runtime.atomic import write_atomic, write_json_atomic
from curate.runtime.executors import TaskSlice
from curate.runtime.records import logged_stage

LABELS_TABLE = "labels.parquet"
REPRESENTATION_TABLE = "representation.parquet"
ASSOCIATION_TABLE = "association.parquet"
RETRIEVAL_TABLE = "retrieval.parquet"
CONCEPTS_JSON = "concepts.json"
REPORT_JSON = "audit.json"
AUDIT_FORMAT = 1

Infer = Literal["caption", "image", "both"]
TargetRule = Literal["spec", "uniform", "pool"]
Desired = Literal["uniform", "pool"]


@dataclass(frozen=True)
class AuditOptions:
    """How labels are inferred and bias is measured."""

    infer: Infer | None = None  # None: both when image embeddings are at hand, else caption
    min_confidence: float = 0.6  # image labels below this top probability stay unknown
    person_threshold: float = 0.5  # image person probability needed to call it a person
    target: TargetRule = "spec"  # π for representation/association bias
    k: int = 1000  # retrieval depth (capped at the labelled candidates)
    desired: Desired = "uniform"  # retrieval's desired distribution
    alpha: float = 1.0  # skew smoothing (added to every group count)
    prompt: str = "a photo of a {concept}."
    retrieval: bool = True
    retrieval_max_concepts: int = 1000  # the most matched concepts get a retrieval row
    min_support: int = 20  # concepts with fewer labelled samples are left out of summaries

    def validate(self) -> None:
        if not 0 <= self.min_confidence <= 1:
            raise InputError(f"--min-confidence must be in [0, 1], got {self.min_confidence}")
        if not 0 <= self.person_threshold <= 1:
            raise InputError(f"--person-threshold must be in [0, 1], got {self.person_threshold}")
        if self.k < 1:
            raise InputError(f"--k must be at least 1, got {self.k}")
        if self.alpha < 0:
            raise InputError(f"--alpha must be >= 0, got {self.alpha}")
        try:
            filled = self.prompt.format(concept="\0")
        except (KeyError, IndexError, ValueError) as exc:
            raise InputError(
                f"--prompt may only use the placeholder {{concept}}, got {self.prompt!r}"
            ) from exc
        if "\0" not in filled:
            raise InputError(f"--prompt must contain {{concept}}, got {self.prompt!r}")
        if self.min_support < 1:
            raise InputError(f"--min-support must be at least 1, got {self.min_support}")


@dataclass
class SkewedConcept:
    concept: str
    total: float
    group: str  # the most over-represented group
    share: float
    target: float
    ci_low: float
    ci_high: float


@dataclass
class AttributeSummary:
    name: str
    groups: list[str]
    target: list[float]
    labelled: int
    mixed: int
    from_caption: int
    from_image: int
    counts: list[float]
    shares: list[float]
    ci_low: list[float]
    ci_high: list[float]
    representation_bias: float
    association_bias: float  # over concepts with at least min_support labelled samples
    concepts_measured: int
    most_skewed: list[SkewedConcept]
    retrieval_k: int | None = None
    retrieval_max_skew_mean: float | None = None
    retrieval_ndkl_mean: float | None = None
    retrieval_worst: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class AuditReport:
    source: str
    out: str
    concepts: str
    infer: str
    rows: int = 0
    failed: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    persons: int = 0
    persons_caption: int = 0
    persons_image: int = 0
    images: int = 0  # OK rows with an image embedding
    with_concept: int = 0
    person_gated: bool = True  # False: the spec has no person block, every sample counts
    retrieval: bool = False  # retrieval.parquet was written
    attributes: list[AttributeSummary] = field(default_factory=list)
    seconds: float = 0.0
    shard_errors: dict[str, str] = field(default_factory=dict)  # units that could not be read
    task: str = "local"
    complete: bool = True  # False: an array task matched its share; the measuring is to come

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class AuditConfig:
    """Every option of `curate audit`: the concepts and attribute spec (loaded:
    `balance.metadata.load_metadata`, `fairness.spec.load_spec`), the measures, where image
    embeddings come from, the match rule, the caption column and the zero-shot device."""

    concepts: Metadata
    spec: AttributeSpec
    options: AuditOptions = field(default_factory=AuditOptions)
    run: Path | None = None
    mode: MatchMode = MatchMode.words
    caption_column: str | None = None
    device: str = "auto"


@dataclass(frozen=True)
class AuditedAttribute:
    name: str
    groups: list[str]
    target: list[float]  # the audit's π, in group order
    swap: str | None


@dataclass
class Pool:
    """The labelled pool as arrays, shared by audit and rebalance."""

    frame: pl.DataFrame  # labels.parquet's rows
    ok: np.ndarray  # (N,) bool
    concept_indptr: np.ndarray
    concept_indices: np.ndarray
    concepts: list[str]
    labels: dict[str, np.ndarray]  # attribute → (N,) int group id, −1 unlabelled or failed
    attributes: list[AuditedAttribute]  # in the audit's order


def group_ids(values: Sequence[str | None], groups: Sequence[str]) -> np.ndarray:
    """Group names to ids; None, ``mixed`` and unknown names become −1."""
    index = {g: i for i, g in enumerate(groups)}
    return np.fromiter((index.get(v, -1) if v else -1 for v in values), np.int64, len(values))


def target_shares(given: Sequence[float], rule: str, labels: np.ndarray) -> np.ndarray:
    """π: the given shares (``spec`` / ``audit``), ``uniform``, or the pool's own labelled
    shares (``pool``, each group count plus one)."""
    k = len(given)
    if rule == "uniform":
        return np.full(k, 1.0 / k)
    if rule == "pool":
        counts = np.bincount(labels[labels >= 0], minlength=k).astype(np.float64)
        return smoothed_shares(counts, 1.0)
    return np.asarray(given, dtype=np.float64)


@dataclass
class RunImages:
    """A run folder's image embeddings aligned with the pool's rows, and its model."""

    embeddings: np.ndarray  # (N, dim) float16; zeros where a row has no embedding
    present: np.ndarray  # (N,) bool
    encode: Callable[[list[str]], np.ndarray]  # the run model's text encoder
    logit_scale: float


def _run_images(uids: Sequence[str], ok: np.ndarray, run_path: Path, device: str) -> RunImages:
    """Join the run's embeddings to the pool by uid (the first OK run row of a uid wins)."""
    from curate.embedding.stage import ModelSpec
    from curate.embedding.store import RunFolder
    from curate.scoring.stage import load_pool

    run = RunFolder(run_path)
    if run.read_record() is None:
        raise InputError(f"--run {run_path} is not a curate run folder (no run.json)")
    meta, arrays = load_pool(run, run.complete_stems(), with_embeddings=["image_emb"])
    model_record = run.model_record()
    run_ok = np.asarray(meta.column("error").is_null())
    ok_uids = [
        u.lower() for u, good in zip(meta.column("uid").to_pylist(), run_ok, strict=True) if good
    ]
    position: dict[str, int] = {}
    for i, u in enumerate(ok_uids):
        position.setdefault(u, i)
    embeddings = np.zeros((len(uids), int(model_record["embed_dim"])), dtype=np.float16)
    pairs = [(i, position[u]) for i, u in enumerate(uids) if ok[i] and u in position]
    present = np.zeros(len(uids), dtype=bool)
    if pairs:
        mine, theirs = (np.asarray(x) for x in zip(*pairs, strict=True))
        embeddings[mine] = arrays["image_emb"][theirs]
        present[mine] = True
    model = ModelSpec(
        model=model_record["model"], pretrained=model_record.get("pretrained"), device=device
    ).load()
    if model.fingerprint != model_record["fingerprint"]:
        raise InputError(
            f"the model of run {run_path} now loads with other weights than it was embedded with"
        )
    return RunImages(embeddings, present, model.encode_texts, float(model_record["logit_scale"]))


def _zero_shot(images: RunImages, spec: AttributeSpec, options: AuditOptions) -> dict[str, Any]:
    """Person probabilities and confident group labels for every row with an embedding."""
    out: dict[str, Any] = {}
    if spec.person_prompts:
        classes = prompt_ensembles(
            images.encode, [spec.person_prompts, *[[p] for p in spec.other_prompts]]
        )
        out["person_prob"] = class_probabilities(images.embeddings, classes, images.logit_scale)[
            :, 0
        ]
    for attribute in spec.attributes:
        if attribute.has_prompts:
            classes = prompt_ensembles(images.encode, [g.prompts for g in attribute.groups])
            probs = class_probabilities(images.embeddings, classes, images.logit_scale)
            out[attribute.name] = confident_labels(probs, options.min_confidence)
    return out


@logged_stage("audit")
def audit(
    sources: str | Sequence[str],
    concepts: Metadata,
    out: Path,
    spec: AttributeSpec,
    options: AuditOptions = AuditOptions(),
    *,
    run: Path | None = None,
    mode: MatchMode = MatchMode.words,
    caption_column: str | None = None,
    executor: Any = None,
    tasks: TaskSlice | None = None,
    device: str = "auto",
    on_units: Callable[[int], None] | None = None,
    on_unit: Callable[[int], None] | None = None,
    on_step: Callable[[str], None] | None = None,
) -> AuditReport:
    """Match, label and measure; writes every output file and returns the summary.

    As an array task (`tasks` of several) only this task's share of the matching runs and the
    report says ``complete=False``; a later single call matches nothing more and measures."""
    from curate.embedding.store import RunFolder

    start = time.perf_counter()
    options.validate()
    specs = [sources] if isinstance(sources, str) else list(sources)
    if run is None and len(specs) == 1 and RunFolder.is_run(specs[0]):
        run = Path(specs[0])  # captions from the run's scores, images from its embeddings
    can_caption = any(a.has_terms for a in spec.attributes)
    can_image = run is not None and any(a.has_prompts for a in spec.attributes)
    infer: Infer = options.infer or (
        "both" if can_caption and can_image else "image" if can_image else "caption"
    )
    if infer != "caption" and run is None:
        raise InputError(f"--infer {infer} needs image embeddings: give --run RUN")
    if infer != "image" and not any(a.has_terms for a in spec.attributes):
        raise InputError("no attribute in the spec has caption terms; use --infer image")
    if infer != "caption" and not any(a.has_prompts for a in spec.attributes):
        raise InputError("no attribute in the spec has image prompts; use --infer caption")
    if infer == "image" and spec.person_terms and not spec.person_prompts:
        raise InputError(
            "--infer image: the spec has person terms but no person prompts, so no image could "
            "be told to show a person; add person.prompts or use --infer both"
        )

    units = resolve_units(specs, caption_column)
    if on_units:
        on_units(len(units))
    tasks = tasks or TaskSlice()
    matched = match_units(
        units, concepts, out, mode=mode, executor=executor, tasks=tasks, on_unit=on_unit
    )
    if tasks.count > 1:
        return AuditReport(
            source=" ".join(map(str, specs)),
            out=str(out),
            concepts=str(concepts.path),
            infer=infer,
            rows=matched.samples,
            shard_errors=dict(matched.failed),
            seconds=time.perf_counter() - start,
            task=tasks.label,
            complete=False,
        )
    if on_step:
        on_step("labelling")
    frame, shard_errors = read_matches(
        units, concepts, out, mode, columns=("uid", "shard", "key", "caption", "error", "entry_ids")
    )
    shard_errors.update(matched.failed)
    if frame.height == 0:
        raise_empty(" ".join(map(str, specs)), shard_errors)
    uid, errors = pool_errors(frame)
    ok = errors.is_null().to_numpy()
    indptr, indices = matches_csr(frame["entry_ids"], ok)
    captions = frame.select(
        pl.when(pl.Series(ok)).then(pl.col("caption")).alias("caption")
    ).to_series()

    columns: dict[str, Any] = {
        "uid": uid,
        "shard": frame["shard"],
        "key": frame["key"],
        "caption": frame["caption"],
        "error": errors,
    }
    use_captions = infer != "image"
    person_caption = (
        caption_mentions_person(captions, spec) if use_captions else np.zeros(len(ok), bool)
    )
    columns["person_caption"] = person_caption
    images: RunImages | None = None
    image: dict[str, Any] = {}
    if run is not None and (infer != "caption" or options.retrieval):
        if on_step:
            on_step("reading image embeddings")
        images = _run_images(uid.to_list(), ok, Path(run), device)
        if infer != "caption":
            if on_step:
                on_step("zero-shot labels from images")
            image = _zero_shot(images, spec, options)
    has_image = images.present if images is not None else np.zeros(len(ok), bool)
    person_prob = image.get("person_prob")
    person_image = (
        np.nan_to_num(person_prob, nan=-1.0) >= options.person_threshold
        if person_prob is not None
        else np.zeros(len(ok), bool)
    )
    # Without person terms or prompts the attributes describe every sample (e.g. colour).
    gated = bool(spec.person_terms or spec.person_prompts)
    person = ok & (person_caption | person_image) if gated else ok.copy()
    columns["person_image_prob"] = (
        pl.Series(np.where(has_image, person_prob, np.nan)).fill_nan(None)
        if person_prob is not None
        else pl.Series([None] * len(ok), dtype=pl.Float32)
    )
    columns["person"] = person

    labels: dict[str, np.ndarray] = {}
    summaries: list[AttributeSummary] = []
    association_frames: list[pl.DataFrame] = []
    representation_frames: list[pl.DataFrame] = []
    retrieval_frames: list[pl.DataFrame] = []
    names = concepts.entries
    concept_prompts: ConceptPrompts | None = None
    for attribute in spec.attributes:
        groups = attribute.group_names
        text_labels = (
            caption_labels(captions, attribute)
            if use_captions and attribute.has_terms
            else [None] * len(ok)
        )
        if attribute.name in image:
            ids, confidence = image[attribute.name]
            image_labels = [
                groups[i] if i >= 0 and p else None
                for i, p in zip(ids.tolist(), person.tolist(), strict=True)
            ]
        else:
            confidence = np.full(len(ok), np.nan, dtype=np.float32)
            image_labels = [None] * len(ok)
        combined = [
            t if t is not None else i for t, i in zip(text_labels, image_labels, strict=True)
        ]
        source = [
            "caption" if t is not None else "image" if i is not None else None
            for t, i in zip(text_labels, image_labels, strict=True)
        ]
        name = attribute.name
        columns[f"{name}_caption"] = pl.Series(text_labels, dtype=pl.String)
        columns[f"{name}_image"] = pl.Series(image_labels, dtype=pl.String)
        columns[f"{name}_image_conf"] = pl.Series(confidence).fill_nan(None)
        columns[name] = pl.Series(combined, dtype=pl.String)
        columns[f"{name}_source"] = pl.Series(source, dtype=pl.String)
        ids_all = np.where(ok, group_ids(combined, groups), -1)
        labels[name] = ids_all
        target = target_shares(attribute.target, options.target, ids_all)
        rep = representation_bias(ids_all, len(groups), target)
        assoc = association_bias(ids_all, indptr, indices, concepts.size, len(groups), target)
        representation_frames.append(_share_frame(name, groups, rep, None))
        association_frames.append(_share_frame(name, groups, assoc, names))
        summary = _summarize_attribute(
            attribute, target, ids_all, combined, source, rep, assoc, names, options.min_support
        )
        if images is not None and options.retrieval:
            if on_step:
                on_step(f"retrieval bias ({name})")
            if concept_prompts is None:
                concept_prompts = _concept_prompts(images, indices, names, options)
            retrieval = _retrieval(attribute, ids_all, images, concept_prompts, names, options)
            retrieval_frames.append(retrieval)
            _summarize_retrieval(summary, retrieval)
        summaries.append(summary)

    columns["concepts"] = pl.from_arrow(
        pa.LargeListArray.from_arrays(pa.array(indptr), pa.array(indices.astype(np.int32)))
    ).cast(pl.List(pl.Int32))
    table = pl.DataFrame(columns)
    failures = Counter(failure_code(e) for e in errors.drop_nulls().to_list())
    report = AuditReport(
        source=" ".join(map(str, specs)),
        out=str(out),
        concepts=str(concepts.path),
        infer=infer,
        rows=len(ok),
        failed=int((~ok).sum()),
        failures=dict(sorted(failures.items())),
        persons=int(person.sum()),
        persons_caption=int((ok & person_caption).sum()),
        persons_image=int((ok & person_image).sum()),
        images=int((ok & has_image).sum()),
        with_concept=int((np.diff(indptr) > 0).sum()),
        person_gated=gated,
        retrieval=bool(retrieval_frames),
        attributes=summaries,
        shard_errors=shard_errors,
    )
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / LABELS_TABLE, lambda tmp: table.write_parquet(tmp))
    write_atomic(
        out / REPRESENTATION_TABLE,
        lambda tmp: pl.concat(representation_frames).write_parquet(tmp),
    )
    write_atomic(
        out / ASSOCIATION_TABLE, lambda tmp: pl.concat(association_frames).write_parquet(tmp)
    )
    if retrieval_frames:
        write_atomic(
            out / RETRIEVAL_TABLE, lambda tmp: pl.concat(retrieval_frames).write_parquet(tmp)
        )
    else:
        (out / RETRIEVAL_TABLE).unlink(missing_ok=True)
    write_json_atomic(
        out / CONCEPTS_JSON,
        {"source": str(concepts.path), "sha256": concepts.sha256, "entries": names},
    )
    report.seconds = time.perf_counter() - start
    write_json_atomic(
        out / REPORT_JSON,
        {
            "format": AUDIT_FORMAT,
            "options": {**asdict(options), "infer": infer, "match": mode.value},
            "run": str(Path(run).resolve()) if run is not None else None,
            "spec": spec.to_json(),
            # Ordered lists (JSON objects are written with sorted keys): attribute order, group
            # order and targets as the labels and tables use them.
            "attributes": [
                {
                    "name": a.name,
                    "groups": list(a.group_names),
                    "target": target_shares(a.target, options.target, labels[a.name]).tolist(),
                    "swap": str(a.swap) if a.swap else None,
                }
                for a in spec.attributes
            ],
            "report": {k: v for k, v in report.to_json().items() if k != "seconds"},
        },
    )
    return report


def _share_frame(
    attribute: str, groups: Sequence[str], table: ShareTable, concepts: Sequence[str] | None
) -> pl.DataFrame:
    """Long format: one row per (concept or pool, group)."""
    rows, k = table.counts.shape
    data: dict[str, Any] = {"attribute": [attribute] * (rows * k)}
    if concepts is not None:
        data["concept_id"] = np.repeat(np.arange(rows, dtype=np.int32), k)
        data["concept"] = np.repeat(np.asarray(concepts, dtype=object), k).tolist()
    data |= {
        "group": list(groups) * rows,
        "count": table.counts.ravel(),
        "total": np.repeat(table.totals, k),
        "share": table.shares.ravel(),
        "target": np.tile(table.target, rows),
        "diff": table.diff.ravel(),
        "ci_low": table.ci_low.ravel(),
        "ci_high": table.ci_high.ravel(),
        "bias": np.repeat(table.bias, k),
    }
    frame = pl.DataFrame(data)
    return frame.with_columns(pl.col(pl.Float64).fill_nan(None))


def _summarize_attribute(
    attribute: Attribute,
    target: np.ndarray,
    ids: np.ndarray,
    combined: Sequence[str | None],
    source: Sequence[str | None],
    rep: ShareTable,
    assoc: ShareTable,
    concepts: Sequence[str],
    min_support: int,
    top: int = 10,
) -> AttributeSummary:
    groups = attribute.group_names
    supported = np.nan_to_num(assoc.totals) >= min_support
    bias = np.where(supported, np.nan_to_num(assoc.bias, nan=-1.0), -1.0)
    order = [int(r) for r in np.argsort(-bias, kind="stable")[:top] if bias[r] >= 0]
    skewed = []
    for r in order:
        g = int(np.nanargmax(assoc.diff[r]))  # the most over-represented group
        skewed.append(
            SkewedConcept(
                concept=concepts[r],
                total=float(assoc.totals[r]),
                group=groups[g],
                share=float(assoc.shares[r, g]),
                target=float(target[g]),
                ci_low=float(assoc.ci_low[r, g]),
                ci_high=float(assoc.ci_high[r, g]),
            )
        )
    sources = Counter(s for s, i in zip(source, ids.tolist(), strict=True) if i >= 0)
    return AttributeSummary(
        name=attribute.name,
        groups=list(groups),
        target=target.tolist(),
        labelled=int((ids >= 0).sum()),
        mixed=sum(1 for c in combined if c == MIXED),
        from_caption=sources.get("caption", 0),
        from_image=sources.get("image", 0),
        counts=rep.counts[0].tolist(),
        shares=_floats(rep.shares[0]),
        ci_low=_floats(rep.ci_low[0]),
        ci_high=_floats(rep.ci_high[0]),
        representation_bias=_float(rep.max_bias),
        association_bias=float(bias.max()) if supported.any() else float("nan"),
        concepts_measured=int(supported.sum()),
        most_skewed=skewed,
    )


@dataclass
class ConceptPrompts:
    """The neutral prompts of the most matched concepts, embedded once for every attribute."""

    concept_ids: list[int]
    prompts: list[str]
    embeddings: np.ndarray  # (len(prompts), dim) float32


def _concept_prompts(
    images: RunImages, indices: np.ndarray, concepts: Sequence[str], options: AuditOptions
) -> ConceptPrompts:
    counts = np.bincount(indices, minlength=len(concepts))
    chosen = [
        int(r)
        for r in np.argsort(-counts, kind="stable")[: options.retrieval_max_concepts]
        if counts[r] > 0
    ]
    prompts = [options.prompt.format(concept=concepts[r]) for r in chosen]
    embeddings = (
        images.encode(prompts).astype(np.float32)
        if prompts
        else np.zeros((0, images.embeddings.shape[1]), dtype=np.float32)
    )
    return ConceptPrompts(chosen, prompts, embeddings)


def _retrieval(
    attribute: Attribute,
    ids: np.ndarray,
    images: RunImages,
    concept_prompts: ConceptPrompts,
    concepts: Sequence[str],
    options: AuditOptions,
) -> pl.DataFrame:
    """MaxSkew@k, MinSkew@k and NDKL of one neutral prompt per concept over labelled images."""
    groups = attribute.group_names
    candidates = np.flatnonzero((ids >= 0) & images.present)
    chosen, prompts, text = (
        concept_prompts.concept_ids,
        concept_prompts.prompts,
        concept_prompts.embeddings,
    )
    labels = ids[candidates]
    if options.desired == "uniform":
        desired = np.full(len(groups), 1.0 / len(groups))
    else:
        desired = smoothed_shares(np.bincount(labels, minlength=len(groups)).astype(float), 1.0)
    rows: dict[str, list[Any]] = {
        key: []
        for key in (
            "concept_id",
            "concept",
            "prompt",
            "k",
            "counts",
            "skew",
            "max_skew",
            "min_skew",
            "ndkl",
        )
    }
    if chosen and len(candidates):
        emb = images.embeddings[candidates].astype(np.float32)
        for start in range(0, len(chosen), 64):
            sims = emb @ text[start : start + 64].T
            for j in range(sims.shape[1]):
                r = chosen[start + j]
                ranked = top_k_labels(sims[:, j], labels, options.k)
                result = retrieval_bias(ranked, len(groups), desired, options.alpha)
                rows["concept_id"].append(r)
                rows["concept"].append(concepts[r])
                rows["prompt"].append(prompts[start + j])
                rows["k"].append(result.k)
                rows["counts"].append(result.counts.tolist())
                rows["skew"].append(result.skew.tolist())
                rows["max_skew"].append(result.max_skew)
                rows["min_skew"].append(result.min_skew)
                rows["ndkl"].append(result.ndkl)
    return pl.DataFrame(
        {"attribute": [attribute.name] * len(rows["concept_id"]), **rows},
        schema_overrides={
            "attribute": pl.String,
            "concept_id": pl.Int32,
            "concept": pl.String,
            "prompt": pl.String,
            "k": pl.Int64,
            "counts": pl.List(pl.Float64),
            "skew": pl.List(pl.Float64),
            "max_skew": pl.Float64,
            "min_skew": pl.Float64,
            "ndkl": pl.Float64,
        },
    ).with_columns(pl.lit(",".join(groups)).alias("groups"))


def _summarize_retrieval(summary: AttributeSummary, frame: pl.DataFrame, top: int = 10) -> None:
    if frame.height == 0:
        return
    summary.retrieval_k = int(frame["k"].max())
    summary.retrieval_max_skew_mean = _float(frame["max_skew"].mean())
    summary.retrieval_ndkl_mean = _float(frame["ndkl"].mean())
    worst = frame.sort("max_skew", descending=True, nulls_last=True).head(top)
    summary.retrieval_worst = [
        {
            "concept": row["concept"],
            "k": row["k"],
            "max_skew": row["max_skew"],
            "ndkl": row["ndkl"],
            "group": summary.groups[int(np.argmax(row["skew"]))] if row["skew"] else None,
        }
        for row in worst.iter_rows(named=True)
    ]


def _float(value: Any) -> float:
    return float("nan") if value is None else float(value)


def _floats(values: np.ndarray) -> list[float]:
    return [float(v) for v in values]


def read_audit(folder: Path) -> tuple[dict[str, Any], Pool]:
    """An audit folder's record and its labelled pool, for rebalancing."""
    record_path = folder / REPORT_JSON
    try:
        record = json.loads(record_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"{folder} is not a curate audit folder (no readable audit.json)") from exc
    if record.get("format") != AUDIT_FORMAT:
        raise InputError(f"{record_path}: unknown audit format {record.get('format')!r}")
    try:
        frame = pl.read_parquet(folder / LABELS_TABLE)
        concepts = json.loads((folder / CONCEPTS_JSON).read_text())["entries"]
    except (OSError, pl.exceptions.PolarsError, json.JSONDecodeError, KeyError) as exc:
        raise InputError(f"{folder}: cannot read labels.parquet / concepts.json: {exc}") from exc
    ok = frame["error"].is_null().to_numpy()
    indptr, indices = matches_csr(frame["concepts"], ok)
    try:
        attributes = [AuditedAttribute(**a) for a in record["attributes"]]
    except (KeyError, TypeError) as exc:
        raise InputError(f"{record_path}: no readable attribute list") from exc
    labels = {
        a.name: np.where(ok, group_ids(frame[a.name].to_list(), a.groups), -1) for a in attributes
    }
    return record, Pool(frame, ok, indptr, indices, list(concepts), labels, attributes)
