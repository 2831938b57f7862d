"""Attribute specs, caption and image labelling, and the audit stage against known ground truth."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from fairkit import OCCUPATIONS, people_rows, write_people_shards

from curate.balancing.metadata import load_metadata
from curate.errors import InputError
from curate.fairness.audit import AuditOptions, audit, read_audit
from curate.fairness.lexicon import MIXED, caption_labels, caption_mentions_person
from curate.fairness.spec import load_spec
from curate.fairness.zeroshot import class_probabilities, confident_labels, prompt_ensembles

# --------------------------------------------------------------------------------------------
# Specs
# --------------------------------------------------------------------------------------------


def test_default_spec_loads_with_gender_and_age() -> None:
    spec = load_spec()
    assert [a.name for a in spec.attributes] == ["gender", "age"]
    gender = spec.attribute("gender")
    assert gender.group_names == ("female", "male")
    assert gender.target == (0.5, 0.5)
    assert gender.swap is not None and gender.swap.is_file()
    assert all(g.terms and g.prompts for a in spec.attributes for g in a.groups)
    assert spec.person_prompts and spec.other_prompts and spec.person_terms
    assert [a.name for a in spec.select(["age"]).attributes] == ["age"]
    with pytest.raises(InputError, match="not in spec"):
        spec.select(["race"])


def _write(tmp_path: Path, text: str, name: str = "spec.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


GOOD = """
attributes:
  colour:
    groups:
      red: {terms: [red, crimson], prompts: [a red thing]}
      blue: {terms: [blue], prompts: [a blue thing]}
    target: {red: 0.25, blue: 0.75}
"""


def test_user_spec_in_yaml_and_json(tmp_path: Path) -> None:
    spec = load_spec(_write(tmp_path, GOOD))
    colour = spec.attribute("colour")
    assert colour.target == (0.25, 0.75)
    assert not spec.person_terms and not spec.person_prompts
    as_json = {
        "attributes": {
            "colour": {"groups": {"red": {"terms": ["red"]}, "blue": {"prompts": ["a blue thing"]}}}
        }
    }
    spec = load_spec(_write(tmp_path, json.dumps(as_json), "spec.json"))
    assert spec.attribute("colour").target == (0.5, 0.5)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("attributes: [1, 2]", "attributes: must be a non-empty mapping"),
        ("{attributes: {Colour: {groups: {a: {terms: [x]}, b: {terms: [y]}}}}}", "lower-case"),
        ("{attributes: {c: {groups: {a: {terms: [x]}}}}}", "at least two groups"),
        ("{attributes: {c: {groups: {a: {terms: [x]}, mixed: {terms: [y]}}}}}", "reserved"),
        ("{attributes: {c: {groups: {a: {terms: [x]}, b: {terms: [X]}}}}}", "also in a"),
        ("{attributes: {c: {groups: {a: {terms: [x, x]}, b: {terms: [y]}}}}}", "listed twice"),
        ("{attributes: {c: {groups: {a: {}, b: {terms: [y]}}}}}", "needs terms"),
        ("{attributes: {c: {groups: {a: {terms: ['']}, b: {terms: [y]}}}}}", "non-empty string"),
        ("{attributes: {c: {groups: {a: {terms: [mr.]}, b: {terms: [y]}}}}}", "letter or digit"),
        (
            "{attributes: {c: {groups: {a: {terms: [x]}, b: {terms: [y]}}, "
            "target: {a: 0.5, b: 0.6}}}}",
            "sum to 1.1",
        ),
        (
            "{attributes: {c: {groups: {a: {terms: [x]}, b: {terms: [y]}}, target: {a: 1}}}}",
            "share for each group",
        ),
        ("{attributes: {c: {groups: {a: {terms: [x]}, b: {terms: [y]}}, swap: nope.txt}}}", "nope"),
        ("{attributes: {c: {groups: {a: {terms: [x]}, b: {terms: [y]}}, colour: 1}}}", "unknown"),
        ("{version: 2, attributes: {}}", "version"),
        ("{person: {prompts: [a]}, attributes: {}}", "other_prompts"),
        ("attributes: {c: [", "invalid YAML at line"),
    ],
)
def test_spec_errors_are_one_line_naming_the_key(tmp_path: Path, text: str, message: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(InputError) as exc:
        load_spec(path)
    assert message in str(exc.value)
    assert "\n" not in str(exc.value)


def test_unreadable_spec(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="cannot read attribute spec"):
        load_spec(tmp_path / "missing.yaml")
    path = tmp_path / "bad.json"
    path.write_text("{")
    with pytest.raises(InputError, match="invalid JSON at line 1"):
        load_spec(path)


# --------------------------------------------------------------------------------------------
# Caption labels
# --------------------------------------------------------------------------------------------


def test_caption_labels_by_hand() -> None:
    spec = load_spec()
    gender, age = spec.attribute("gender"), spec.attribute("age")
    captions = [
        "A WOMAN reading",
        "the man's hat",
        "a man and a woman",
        "shaman manager at work",  # no word-boundary match inside words
        "womanhood",
        "an old man on a bench",
        "Old   Man fishing",  # whitespace inside a multi-word term
        "",
        None,
    ]
    assert caption_labels(captions, gender) == [
        "female",
        "male",
        MIXED,
        None,
        None,
        "male",
        "male",
        None,
        None,
    ]
    # Longest match first: "old man" is senior, not adult.
    assert caption_labels(captions, age)[5:7] == ["senior", "senior"]
    assert caption_labels(["a young woman"], age) == ["adult"]
    persons = caption_mentions_person(captions, spec)
    assert persons.tolist() == [True, True, True, False, False, True, True, False, False]


def _oracle_groups(text: str, groups: dict[str, list[str]]) -> set[str]:
    """Every group with a term present on word boundaries, one regex per term."""
    found = set()
    for group, terms in groups.items():
        for term in terms:
            pattern = r"(?<!\w)" + r"\s+".join(map(re.escape, term.split())) + r"(?!\w)"
            if re.search(pattern, text, flags=re.IGNORECASE):
                found.add(group)
    return found


def test_caption_labels_match_a_per_term_oracle_on_random_captions() -> None:
    """Gender terms never nest, so 'a term of the group is present' is the whole rule."""
    gender = load_spec().attribute("gender")
    groups = {g.name: list(g.terms) for g in gender.groups}
    vocab = [t for ts in groups.values() for t in ts] + [
        "human",
        "manager",
        "shell",
        "hershey",
        "womanly",
        "the",
        "at",
        "a",
        "photo",
        "of",
    ]
    rng = random.Random(3)
    captions = []
    for _ in range(3000):
        words = [rng.choice(vocab) for _ in range(rng.randint(0, 6))]
        words = [
            w.upper() if rng.random() < 0.1 else w.title() if rng.random() < 0.1 else w
            for w in words
        ]
        seps = [rng.choice([" ", ", ", " - ", "'s ", ". "]) for _ in words]
        captions.append("".join(w + s for w, s in zip(words, seps, strict=True)))
    got = caption_labels(captions, gender)
    for caption, label in zip(captions, got, strict=True):
        want = _oracle_groups(caption, groups)
        expected = None if not want else want.pop() if len(want) == 1 else MIXED
        assert label == expected, caption


def test_caption_labels_take_a_series_and_specs_without_terms(tmp_path: Path) -> None:
    spec = load_spec(_write(tmp_path, GOOD))
    colour = spec.attribute("colour")
    series = pl.Series(["CRIMSON sky", None, "red and blue", "reddish"], dtype=pl.String)
    assert caption_labels(series, colour) == ["red", None, MIXED, None]
    assert caption_mentions_person(series, spec).tolist() == [True, False, True, False]


# --------------------------------------------------------------------------------------------
# Zero-shot
# --------------------------------------------------------------------------------------------


def test_prompt_ensembles_average_normalised_prompts() -> None:
    table = {"a": [3.0, 0.0], "b": [0.0, 1.0], "c": [1.0, 1.0]}

    def encode(texts: list[str]) -> np.ndarray:
        return np.array([table[t] for t in texts])

    out = prompt_ensembles(encode, [["a", "b"], ["c"]])
    want0 = np.array([1.0, 1.0]) / 2
    want0 /= np.linalg.norm(want0)
    np.testing.assert_allclose(out[0], want0, rtol=1e-6)
    np.testing.assert_allclose(out[1], np.array([1, 1]) / np.sqrt(2), rtol=1e-6)
    with pytest.raises(ValueError, match="at least one prompt"):
        prompt_ensembles(encode, [["a"], []])


def test_class_probabilities_and_confident_labels_against_a_loop() -> None:
    rng = np.random.default_rng(0)
    images = rng.normal(size=(50, 8)).astype(np.float16)
    images[3] = 0  # a sample without an embedding
    classes = rng.normal(size=(3, 8))
    classes /= np.linalg.norm(classes, axis=1, keepdims=True)
    probs = class_probabilities(images, classes, logit_scale=7.0, chunk=16)
    for i in range(50):
        if i == 3:
            assert np.isnan(probs[i]).all()
            continue
        logits = [7.0 * float(np.dot(images[i].astype(np.float64), c)) for c in classes]
        exp = np.exp(np.array(logits) - max(logits))
        np.testing.assert_allclose(probs[i], exp / exp.sum(), rtol=1e-4, atol=1e-6)
    labels, conf = confident_labels(probs, 0.6)
    for i in range(50):
        if i == 3:
            assert labels[i] == -1 and np.isnan(conf[i])
            continue
        best = int(np.argmax(probs[i]))
        assert conf[i] == pytest.approx(probs[i, best])
        assert labels[i] == (best if probs[i, best] >= 0.6 else -1)


# --------------------------------------------------------------------------------------------
# The audit stage on a pool with a known injected association
# --------------------------------------------------------------------------------------------

BIAS = {"nurse": 0.85, "engineer": 0.2}


@pytest.fixture(scope="module")
def people(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list, Path]:
    root = tmp_path_factory.mktemp("people")
    rows = people_rows(1500, BIAS, seed=1)
    write_people_shards(root / "shards", rows, per_shard=500)
    concepts = root / "occupations.txt"
    concepts.write_text("\n".join(OCCUPATIONS) + "\n")
    return root / "shards", rows, concepts


def _truth_counts(rows: list) -> dict[tuple[str, str], int]:
    counts: dict[tuple[str, str], int] = {}
    for row in rows:
        if row.occupation and row.gender in ("female", "male"):
            key = (row.occupation, row.gender)
            counts[key] = counts.get(key, 0) + 1
    return counts


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_audit_counts_match_ground_truth_and_find_the_injected_bias(
    people: tuple[Path, list, Path], tmp_path: Path
) -> None:
    shards, rows, concepts = people
    out = tmp_path / "audit"
    spec = load_spec().select(["gender"])
    report = audit(str(shards), load_metadata(concepts), out, spec, AuditOptions())
    assert report.rows == len(rows) and report.failed == 0
    assert report.infer == "caption"

    association = pl.read_parquet(out / "association.parquet")
    truth = _truth_counts(rows)
    for (occupation, group), n in truth.items():
        got = association.filter((pl.col("concept") == occupation) & (pl.col("group") == group))
        assert got["count"].item() == n, (occupation, group)
    # Representation over every labelled person (occupation or not; mixed captions excluded).
    labelled = [r.gender for r in rows if r.gender in ("female", "male")]
    rep = pl.read_parquet(out / "representation.parquet")
    female = rep.filter(pl.col("group") == "female")
    assert female["count"].item() == labelled.count("female")
    assert female["share"].item() == pytest.approx(labelled.count("female") / len(labelled))

    gender = report.attributes[0]
    assert gender.mixed == sum(r.gender == "mixed" for r in rows)
    assert {c.concept for c in gender.most_skewed[:2]} == {"nurse", "engineer"}
    nurse = next(c for c in gender.most_skewed if c.concept == "nurse")
    assert nurse.group == "female"  # the over-represented group
    share_f = truth[("nurse", "female")] / (truth[("nurse", "female")] + truth[("nurse", "male")])
    assert nurse.share == pytest.approx(share_f)
    engineer = next(c for c in gender.most_skewed if c.concept == "engineer")
    assert engineer.group == "male" and engineer.share > 0.7
    assert nurse.ci_low < nurse.share < nurse.ci_high
    assert gender.association_bias == pytest.approx(abs(share_f - 0.5))

    labels = pl.read_parquet(out / "labels.parquet")
    assert labels.height == len(rows)
    by_uid = {r.uid: r for r in rows}
    for uid, label, source in labels.select("uid", "gender", "gender_source").iter_rows():
        want = by_uid[uid].gender
        assert label == want
        assert source == ("caption" if want else None)
    record, pool = read_audit(out)
    assert record["options"]["infer"] == "caption"
    assert pool.concepts == list(OCCUPATIONS)
    assert (pool.labels["gender"] >= 0).sum() == len(labelled)


def test_audit_accounts_for_bad_rows(tmp_path: Path) -> None:
    rows = people_rows(60, BIAS, seed=2)
    table = pl.DataFrame(
        {
            "uid": [r.uid for r in rows] + [rows[0].uid, "not-a-uid", rows[5].uid.upper()[:-1]],
            "caption": [r.caption for r in rows] + ["a woman nurse", "a man", None],
        }
    )
    path = tmp_path / "pool.parquet"
    table.write_parquet(path)
    concepts = tmp_path / "c.txt"
    concepts.write_text("nurse\nengineer\n")
    out = tmp_path / "audit"
    report = audit(str(path), load_metadata(concepts), out, load_spec(), AuditOptions())
    assert report.rows == 63
    assert report.failed == 3
    assert report.failures == {"bad_uid": 1, "duplicate_uid": 1, "missing_caption": 1}
    labels = pl.read_parquet(out / "labels.parquet")
    assert labels.height == 63
    failed = labels.filter(pl.col("error").is_not_null())
    assert failed["gender"].is_null().all() and failed["concepts"].list.len().sum() == 0


def test_audit_option_errors(people: tuple[Path, list, Path], tmp_path: Path) -> None:
    shards, _, concepts = people
    meta = load_metadata(concepts)
    with pytest.raises(InputError, match="needs image embeddings"):
        audit(str(shards), meta, tmp_path, load_spec(), AuditOptions(infer="image"))
    with pytest.raises(InputError, match="--k"):
        audit(str(shards), meta, tmp_path, load_spec(), AuditOptions(k=0))
    with pytest.raises(InputError, match="concept"):
        audit(str(shards), meta, tmp_path, load_spec(), AuditOptions(prompt="a photo"))


# --------------------------------------------------------------------------------------------
# The image path: zero-shot labels and retrieval with the demo CLIP (it learns colour well)
# --------------------------------------------------------------------------------------------

COLOUR_SPEC = """
attributes:
  colour:
    groups:
      red: {prompts: [a red circle, a red square, a red triangle, a red star, a red cross]}
      blue: {prompts: [a blue circle, a blue square, a blue triangle, a blue star, a blue cross]}
"""


@pytest.fixture(scope="module")
def colour_run(
    tmp_path_factory: pytest.TempPathFactory, demo_cache: Path
) -> tuple[Path, Path, list, Path, Path]:
    from fairkit import colour_rows, write_colour_shards

    from curate.demo.train_tiny import CONFIG_NAME, ensure_demo_model
    from curate.embedding.stage import ModelSpec, embed_shards
    from curate.embedding.store import RunFolder
    from curate.io.shards import resolve_shards

    root = tmp_path_factory.mktemp("colour")
    rows = colour_rows(400, seed=4)
    write_colour_shards(root / "shards", rows)
    checkpoint = ensure_demo_model(demo_cache, log=lambda _: None)
    spec = ModelSpec(model=CONFIG_NAME, pretrained=str(checkpoint), device="cpu")
    urls = resolve_shards([str(root / "shards")])
    embed_shards(urls, RunFolder(root / "run"), spec, num_workers=0, progress=False)
    (root / "colour.yaml").write_text(COLOUR_SPEC)
    (root / "shapes.txt").write_text("circle\nsquare\ntriangle\n")
    return root / "shards", root / "run", rows, root / "colour.yaml", root / "shapes.txt"


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_image_labels_find_the_injected_colour_shape_association(
    colour_run: tuple[Path, Path, list, Path, Path], tmp_path: Path
) -> None:
    shards, run, rows, spec_path, shapes = colour_run
    spec = load_spec(spec_path)
    out = tmp_path / "audit"
    options = AuditOptions(k=40, prompt="a red {concept}")
    report = audit(str(shards), load_metadata(shapes), out, spec, options, run=run, device="cpu")
    assert report.infer == "image" and report.images == len(rows)
    assert not report.person_gated and report.persons == len(rows)
    labels = pl.read_parquet(out / "labels.parquet")
    truth = {uid: colour for uid, _, colour in rows}
    got = dict(zip(labels["uid"].to_list(), labels["colour"].to_list(), strict=True))
    correct = sum(got[u] == c for u, c in truth.items())
    assert correct / len(rows) >= 0.9  # the demo CLIP tells red from blue
    assert labels["colour_source"].drop_nulls().unique().to_list() == ["image"]
    confidence = labels["colour_image_conf"].drop_nulls().to_numpy()
    labelled = labels["colour_image"].is_not_null().to_numpy()
    assert (confidence[labelled[labels["colour_image_conf"].is_not_null().to_numpy()]] >= 0.6).all()

    colour = report.attributes[0]
    by_concept = {c.concept: c for c in colour.most_skewed}
    assert by_concept["circle"].group == "red" and by_concept["circle"].share > 0.7
    assert by_concept["square"].group == "blue" and by_concept["square"].share > 0.7
    # Retrieval ranks by similarity to the prompt: "a red …" retrieves red images.
    retrieval = pl.read_parquet(out / "retrieval.parquet")
    assert retrieval.height == 3 and (retrieval["k"] == 40).all()
    for counts in retrieval["counts"].to_list():
        assert sum(counts) == 40 and counts[0] >= 36
    assert (retrieval["max_skew"] > 0.5).all()
    blue = audit(
        str(shards),
        load_metadata(shapes),
        tmp_path / "blue",
        spec,
        AuditOptions(k=40, prompt="a blue {concept}"),
        run=run,
        device="cpu",
    )
    assert blue.attributes[0].retrieval_worst[0]["group"] == "blue"


def test_library_example_runs(tmp_path: Path) -> None:
    import importlib.util

    path = Path(__file__).parent.parent / "examples" / "fairness_with_library.py"
    spec = importlib.util.spec_from_file_location("fairness_example", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(tmp_path)
    assert result["before"] > 0.3 and result["weights"] <= 0.05 + 1e-6


def _no_nan(text: str) -> dict:
    def refuse(name: str) -> None:
        raise AssertionError(f"non-strict JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


ORDERED_SPEC = """
attributes:
  shade:
    groups:
      red: {terms: [red]}
      blue: {terms: [blue]}
    target: {red: 0.25, blue: 0.75}
  size:
    groups:
      small: {terms: [small]}
      big: {terms: [big]}
"""


def test_rebalance_keeps_group_order_and_targets_of_the_spec(tmp_path: Path) -> None:
    """Groups not in alphabetical order, non-uniform targets, two attributes at once."""
    from curate.fairness.rebalance import RebalanceOptions, rebalance

    rng = random.Random(5)
    rows = []
    for i in range(2000):
        shade = "red" if rng.random() < 0.25 else "blue"
        thing = rng.choice(["car", "kite"])
        size = (
            ("small" if rng.random() < 0.65 else "big")
            if thing == "car"
            else rng.choice(["small", "big"])
        )
        rows.append((f"{i:032x}", f"a {size} {shade} {thing}"))
    table = tmp_path / "pool.parquet"
    pl.DataFrame(rows, schema=["uid", "caption"], orient="row").write_parquet(table)
    concepts = tmp_path / "things.txt"
    concepts.write_text("car\nkite\n")
    spec = load_spec(_write(tmp_path, ORDERED_SPEC))
    report = audit(str(table), load_metadata(concepts), tmp_path / "a", spec, AuditOptions())
    shade = report.attributes[0]
    assert shade.groups == ["red", "blue"] and shade.target == [0.25, 0.75]
    assert shade.representation_bias < 0.03  # the pool is 25% red, as the target
    record = _no_nan((tmp_path / "a" / "audit.json").read_text())
    assert [a["name"] for a in record["attributes"]] == ["shade", "size"]

    result = rebalance(
        tmp_path / "a",
        tmp_path / "r",
        RebalanceOptions(attributes=("shade", "size"), eta=0.8, eps_r=0.05, eps_d=0.05),
    )
    by_name = {c.attribute: c for c in result.attributes}
    assert by_name["shade"].groups == ["red", "blue"]
    assert by_name["shade"].representation_before == pytest.approx(shade.representation_bias)
    assert result.status == "optimal", result.message
    assert by_name["size"].association_before > 0.1  # cars are mostly small
    for change in by_name.values():
        assert change.association_weights <= 0.05 + 1e-6
        assert change.representation_weights <= 0.05 + 1e-6
    _no_nan((tmp_path / "r" / "rebalance.json").read_text())
    # Default attribute: the audit's first.
    first = rebalance(tmp_path / "a", tmp_path / "r1", RebalanceOptions(eta=0.9))
    assert [c.attribute for c in first.attributes] == ["shade"]


@pytest.mark.parametrize("name", ["error", "concepts", "uid", "person", "colour_image"])
def test_attribute_names_cannot_clash_with_label_columns(tmp_path: Path, name: str) -> None:
    text = f"{{attributes: {{{name}: {{groups: {{a: {{terms: [x]}}, b: {{terms: [y]}}}}}}}}}}"
    with pytest.raises(InputError, match="clash"):
        load_spec(_write(tmp_path, text))


def test_prompt_and_person_prompt_checks(people: tuple[Path, list, Path], tmp_path: Path) -> None:
    shards, _, concepts = people
    meta = load_metadata(concepts)
    with pytest.raises(InputError, match="only use the placeholder"):
        AuditOptions(prompt="a {concept} at {place}").validate()
    spec_path = _write(
        tmp_path,
        "{person: {terms: [person]}, attributes: {g: {groups: {a: {prompts: [p]}, "
        "b: {prompts: [q]}}}}}",
    )
    with pytest.raises(InputError, match="no person prompts"):
        audit(
            str(shards),
            meta,
            tmp_path / "o",
            load_spec(spec_path),
            AuditOptions(infer="image"),
            run=tmp_path,
        )
