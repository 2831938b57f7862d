"""Rewrite prompts, output validation and the offline `rules` backend.

Oracles: prompt files are hand-broken one way at a time; token counts are checked against
`open_clip.tokenize` (non-zero positions minus start and end); rules outputs go through
`check_rewrite`, the same gate the rewrite stage applies.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from pathlib import Path

import pytest

from curate.errors import InputError
from curate.rewriting import validate
from curate.rewriting.prompts import (
    DEFAULT_PROMPTS,
    PromptTemplate,
    build_chat_messages,
    build_completion_prompt,
    choose_examples,
    load_prompts,
    one_line,
)
from curate.rewriting.rules import (
    ADDED_FRAMES,
    DISTINCT_INDEXES,
    FRAME_MARGIN,
    LEAD_FRAMES,
    RULES_VERSION,
    SYNONYMS,
    rules_rewrite,
)
from curate.rewriting.validate import (
    MAX_CLIP_TOKENS,
    REASONS,
    approx_token_count,
    check_rewrite,
    clean_output,
    clip_token_count,
)

GOOD = {
    "instruction": "Rewrite the caption.",
    "k": 2,
    "banks": {
        "plain": [["a dog", "a canine"], ["red car", "a car that is red"], ["sea", "the ocean"]],
        "short": [["a photo of a tall tree", "tall tree"], ["two cats on a bed", "cats on bed"]],
    },
}


def write(tmp_path: Path, data: object, name: str = "prompts.json") -> Path:
    path = tmp_path / name
    text = data if isinstance(data, str) else json.dumps(data)
    path.write_text(text, encoding="utf-8")
    return path


def changed(**fields: object) -> dict:
    data = json.loads(json.dumps(GOOD))
    data.update(fields)
    return data


# ---------------------------------------------------------------- prompt files


def test_default_prompts_load_and_are_sane() -> None:
    template = load_prompts()
    assert template.source == DEFAULT_PROMPTS
    assert set(template.banks) == {"descriptive", "concise", "alt_text", "paraphrase"}
    assert 0 < template.k <= min(len(pairs) for pairs in template.banks.values())
    assert all(len(pairs) >= 10 for pairs in template.banks.values())
    assert re.fullmatch(r"[0-9a-f]{16}", template.version)
    assert load_prompts(None).version == template.version
    for pairs in template.banks.values():
        for source, target in pairs:
            assert source != target and "\n" not in source + target
            # the examples themselves must pass the gate applied to model outputs
            assert check_rewrite(source, target) is None, (source, target)


def test_file_version_depends_on_content_not_path(tmp_path: Path) -> None:
    a = load_prompts(write(tmp_path, GOOD, "a.json"))
    b = load_prompts(str(write(tmp_path, GOOD, "b.json")))
    assert a.version == b.version and a == b
    assert a.source.endswith("a.json")
    # the default read from a file copy has the packaged version
    default = json.loads(json.dumps(_as_json(load_prompts())))
    assert load_prompts(write(tmp_path, default, "d.json")).version == load_prompts().version
    # style order in the file does not matter
    reordered = changed(banks=dict(reversed(GOOD["banks"].items())))
    assert load_prompts(write(tmp_path, reordered, "r.json")).version == a.version


def _as_json(template: PromptTemplate) -> dict:
    banks = {name: [list(pair) for pair in pairs] for name, pairs in template.banks.items()}
    return {"instruction": template.instruction, "k": template.k, "banks": banks}


@pytest.mark.parametrize(
    "edit",
    [
        {"instruction": "Rewrite this caption."},
        {"k": 1},
        {"banks": {**GOOD["banks"], "plain": [*GOOD["banks"]["plain"][:2], ["sea", "an ocean"]]}},
        {"banks": {**GOOD["banks"], "other": GOOD["banks"]["plain"]}},
        {"banks": {"renamed": GOOD["banks"]["plain"], "short": GOOD["banks"]["short"]}},
        {"banks": {**GOOD["banks"], "plain": GOOD["banks"]["plain"][::-1]}},
    ],
)
def test_version_changes_with_any_field(tmp_path: Path, edit: dict) -> None:
    base = load_prompts(write(tmp_path, GOOD, "base.json")).version
    assert load_prompts(write(tmp_path, changed(**edit), "edit.json")).version != base


BAD_FILES = [
    ("{not json", "not valid JSON"),
    ([1, 2], "must hold a JSON object"),
    (changed(extra=1), "unknown key(s) 'extra'"),
    ({"instruction": "x", "k": 1}, "missing key(s) banks"),
    (changed(format=2), "format 2 is not supported"),
    (changed(instruction=""), "instruction must be a non-empty string"),
    (changed(instruction="   "), "instruction must be a non-empty string"),
    (changed(instruction=["x"]), "instruction must be a non-empty string"),
    (changed(k=-1), "k must be an integer >= 0"),
    (changed(k=1.5), "k must be an integer >= 0"),
    (changed(k=True), "k must be an integer >= 0"),
    (changed(k="2"), "k must be an integer >= 0"),
    (changed(banks={}), "banks must be a non-empty object"),
    (changed(banks=[["a", "b"]]), "banks must be a non-empty object"),
    (changed(banks={"plain": []}), "bank 'plain' must be a non-empty list"),
    (changed(banks={"plain": {"a": "b"}}), "bank 'plain' must be a non-empty list"),
    (changed(banks={" ": [["a", "b"]]}), "style name ' ' must be non-empty"),
    (changed(k=1, banks={"plain": [["a", "b"], "ab"]}), "bank 'plain' pair 2 must be a list"),
    (changed(k=1, banks={"plain": [["a", "b", "c"]]}), "pair 1 must be a list of two strings"),
    (changed(k=1, banks={"plain": [["a", 3]]}), "pair 1 must be a list of two strings"),
    (changed(k=1, banks={"plain": [["", "b"]]}), "pair 1 has an empty source"),
    (changed(k=1, banks={"plain": [["a", " "]]}), "pair 1 has an empty target"),
    (changed(k=1, banks={"plain": [["a\nb", "c"]]}), "line break or tab in its source"),
    (changed(k=1, banks={"plain": [["a", "b\tc"]]}), "line break or tab in its target"),
    (changed(k=1, banks={"plain": [["a => b", "c"]]}), "'=>' in its source"),
    (changed(k=3), "k=3 but bank 'short' has only 2 pair(s)"),
]


@pytest.mark.parametrize(("data", "problem"), BAD_FILES)
def test_bad_prompt_files_name_the_file_and_problem(
    tmp_path: Path, data: object, problem: str
) -> None:
    path = write(tmp_path, data)
    with pytest.raises(InputError) as info:
        load_prompts(path)
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message
    assert problem in message


def test_unreadable_prompt_files(tmp_path: Path) -> None:
    for path, problem in [
        (tmp_path / "missing.json", "does not exist"),
        (tmp_path, "is a folder"),
    ]:
        with pytest.raises(InputError, match=problem):
            load_prompts(path)
    latin = tmp_path / "latin.json"
    latin.write_bytes(b'{"instruction": "caf\xe9"}')
    with pytest.raises(InputError, match="not UTF-8") as info:
        load_prompts(latin)
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------- examples and prompts


def test_choose_examples_is_deterministic_and_varies() -> None:
    template = load_prompts()
    first = choose_examples(template, uid="u1", index=0, seed=0)
    assert first == choose_examples(template, uid="u1", index=0, seed=0)
    style, pairs = first
    assert len(pairs) == template.k == len(set(pairs))
    assert all(pair in template.banks[style] for pair in pairs)

    def spread(calls: list[dict]) -> int:
        return len({str(choose_examples(template, **kw)) for kw in calls})

    assert spread([{"uid": "u1", "index": i, "seed": 0} for i in range(20)]) >= 15
    assert spread([{"uid": f"u{i}", "index": 0, "seed": 0} for i in range(20)]) >= 15
    assert spread([{"uid": "u1", "index": 0, "seed": s} for s in range(20)]) >= 15


def test_choose_examples_styles_uniform_and_pairs_cover_bank() -> None:
    template = load_prompts()
    styles: Counter[str] = Counter()
    pairs: Counter[tuple[str, str]] = Counter()
    draws = 4000
    for i in range(draws):
        style, chosen = choose_examples(template, uid=f"s{i}", index=i % 3, seed=7)
        styles[style] += 1
        pairs.update(chosen)
    expected = draws / len(template.banks)
    assert set(styles) == set(template.banks)
    assert all(abs(n - expected) < 0.1 * expected for n in styles.values()), styles
    every = {pair for bank in template.banks.values() for pair in bank}
    assert set(pairs) == every


def test_choose_examples_k_zero(tmp_path: Path) -> None:
    template = load_prompts(write(tmp_path, changed(k=0)))
    style, pairs = choose_examples(template, uid="u", index=0, seed=0)
    assert style in template.banks and pairs == []
    prompt = build_completion_prompt(template, "a dog", uid="u", index=0, seed=0)
    assert prompt == "Rewrite the caption.\n\na dog =>"
    messages = build_chat_messages(template, "a dog", uid="u", index=0, seed=0)
    assert [m["role"] for m in messages] == ["system", "user"]


@pytest.mark.parametrize(
    ("caption", "line"),
    [
        ("A dog on a beach.", "A dog on a beach."),
        ("two  spaces kept", "two  spaces kept"),
        ("first line\nsecond line", "first line second line"),
        ("windows\r\nbreak\tand tab", "windows break and tab"),
        ("  padded\n", "padded"),
        ("sep\u2028arator", "sep arator"),
    ],
)
def test_completion_prompt_layout(caption: str, line: str) -> None:
    template = load_prompts()
    kw = {"uid": "abc", "index": 2, "seed": 5}
    prompt = build_completion_prompt(template, caption, **kw)
    _, pairs = choose_examples(template, **kw)
    lines = prompt.split("\n")
    assert lines[0] == template.instruction
    assert lines[1] == ""
    assert lines[2:-1] == [f"{s} => {t}" for s, t in pairs]
    assert lines[-1] == f"{line} =>"
    assert prompt.splitlines() == lines  # no other line breaks hide in the prompt
    assert one_line(caption) == line


def test_chat_messages_layout() -> None:
    template = load_prompts()
    kw = {"uid": "abc", "index": 1, "seed": 0}
    messages = build_chat_messages(template, "a cat\non a mat", **kw)
    _, pairs = choose_examples(template, **kw)
    assert messages[0] == {"role": "system", "content": template.instruction}
    turns = messages[1:-1]
    assert [m["role"] for m in turns] == ["user", "assistant"] * len(pairs)
    assert [
        (u["content"], a["content"]) for u, a in zip(turns[::2], turns[1::2], strict=True)
    ] == pairs
    assert messages[-1] == {"role": "user", "content": "a cat on a mat"}
    same = build_chat_messages(template, "a cat\non a mat", **kw)
    assert same == messages
    other = build_chat_messages(template, "a cat\non a mat", uid="abc", index=2, seed=0)
    assert other[-1] == messages[-1]


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("  A dog on a beach.  \n", "A dog on a beach."),
        ('"A dog on a beach"', "A dog on a beach"),
        ("'A dog on a beach'", "A dog on a beach"),
        ("“A dog on a beach”", "A dog on a beach"),
        ("‘the dog’s ball’", "the dog’s ball"),
        ("'the dog's ball'", "the dog's ball"),
        ('"Big" dog and "small" cat', '"Big" dog and "small" cat'),
        ("=> A dog on a beach", "A dog on a beach"),
        ('=>  "A dog"', "A dog"),
        ("A  dog \t on   a beach", "A dog on a beach"),
        ("A dog.\nA cat => a feline", "A dog.\nA cat => a feline"),
        ('"', '"'),
        ("", ""),
    ],
)
def test_clean_output(raw: str, clean: str) -> None:
    assert clean_output(raw) == clean


ORIGINAL = "A brown dog running on the beach"
REASON_CASES = [
    ("", "empty"),
    ("   ", "empty"),
    ("a brown dog running on the beach.", "identical"),
    ("A  BROWN dog running on the beach!!", "identical"),
    ("A brown dog\nrunning on the beach", "identical"),  # identical is checked first
    ("A brown dog runs on the sand.\nA cat => a feline", "multi_line"),
    ("A brown dog runs on the sand.\rMore", "multi_line"),
    ("dog " * 76, "too_long"),
    ("I'm sorry, but I can't help with that.", "refusal"),
    ("I am sorry, I cannot see the image.", "refusal"),
    ("I cannot rewrite this caption.", "refusal"),
    ("I can’t do that.", "refusal"),
    ("As an AI language model, I do not see images.", "refusal"),
    ("I'm unable to view the photo.", "refusal"),
    ("I am unable to comply.", "refusal"),
    ("Sadly it isn't allowed to rewrite this.", "refusal"),
    ("I'd rewrite it as a brown dog on sand", "boilerplate"),
    ("The caption is fine; I apologize for any confusion.", "refusal"),
    ("Sure! A brown dog racing along the sand", "boilerplate"),
    ("Certainly. A brown dog racing along the sand", "boilerplate"),
    ("Here is the rewrite: a brown dog racing along the sand", "boilerplate"),
    ("Here's a brown dog racing along the sand", "boilerplate"),
    ("Rewritten caption: A brown dog racing along the sand", "boilerplate"),
    ("Caption: A brown dog racing along the sand", "boilerplate"),
    ("Of course, a brown dog racing along the sand", "boilerplate"),
    ("rewrite: a brown dog racing along the sand", "boilerplate"),
    ('"Rewritten caption: a brown dog on sand', "boilerplate"),
]


@pytest.mark.parametrize(("text", "reason"), REASON_CASES)
def test_check_rewrite_reasons(text: str, reason: str) -> None:
    assert check_rewrite(ORIGINAL, text) == reason
    assert reason in REASONS


@pytest.mark.parametrize(
    ("original", "text"),
    [
        (ORIGINAL, "A brown dog racing along the sand"),
        (ORIGINAL, "Brown dog running on a beach"),
        (ORIGINAL, "A brown canine running on the seashore."),
        ("Sorry we're closed sign on a door", "Sorry, we're closed sign hanging on a door"),
        ("I can't even: funny cat meme", "I can't even, a funny meme with a cat"),
        ("Here is my new puppy", "Here is my new young dog"),
        ("Caption: sunset over the bay", "Caption: sundown over the bay"),
        ("sure-footed goat on a cliff", "Sure-footed goat standing on a cliff"),
        ("Surely the best pizza in town", "Surely the finest pizza in the town"),
        ("Certification badge", "A certification badge"),
        ("Hawaii sunset", "The Hawaii sunset cannot be beaten"),
        ("Bonsai model tree", "A model bonsai tree"),
        (ORIGINAL, "Brown dog running on the beach, in a picture, " + "very " * 30),
    ],
)
def test_check_rewrite_accepts(original: str, text: str) -> None:
    assert check_rewrite(original, text) is None


def test_check_rewrite_refusal_only_at_start_of_long_texts() -> None:
    long_tail = " ".join(["sand"] * 40)
    assert check_rewrite(ORIGINAL, f"A dog on {long_tail}, as an AI I cannot see") is None
    assert check_rewrite(ORIGINAL, f"As an AI I cannot see {long_tail}") == "refusal"


def test_check_rewrite_token_limit_and_counter() -> None:
    words = ["dog"] * MAX_CLIP_TOKENS
    assert check_rewrite("x", " ".join(words)) is None
    assert check_rewrite("x", " ".join([*words, "dog"])) == "too_long"
    assert check_rewrite("x", "a b c d", max_tokens=3) == "too_long"
    assert check_rewrite("x", "a b c d", max_tokens=3, count_tokens=lambda t: 1) is None


TOKEN_TEXTS = [
    "A golden retriever puppy sleeping on a couch",
    "Men's Classic Denim Jacket | Free Shipping!!!",
    "IMG_2041.jpg - sunset at the pier, 2019",
    "Photosynthesis in chloroplasts; microscopy (x400)",
    "Café crème brûlée – 東京の夜景 😀",
    "&amp; HTML entities &lt;b&gt; and    odd   spacing",
    "",
]


@pytest.mark.parametrize("text", TOKEN_TEXTS)
def test_clip_token_count_matches_open_clip(text: str) -> None:
    import open_clip

    tokens = open_clip.tokenize([text])[0]
    assert clip_token_count(text) == int((tokens != 0).sum()) - 2


def test_clip_token_count_beyond_context() -> None:
    text = "a photo of a dog " * 30  # 150 tokens; tokenize() would truncate to 77
    assert clip_token_count(text) == 150


def test_token_count_fallback_without_open_clip(monkeypatch: pytest.MonkeyPatch) -> None:
    tokenizer = validate._clip_tokenizer()
    monkeypatch.setattr(validate, "_clip_tokenizer", lambda: None)
    for text in TOKEN_TEXTS[:5]:
        approx = clip_token_count(text)
        assert approx == approx_token_count(text)
        real = len(tokenizer.encode(text))
        assert abs(approx - real) <= max(2, real // 5), text


# ---------------------------------------------------------------- rules backend

SUBJECTS = [
    "dog", "big dog", "small cat", "golden retriever puppy", "man", "old man", "young woman",
    "group of people", "little girl", "red car", "vintage bicycle", "wooden boat", "tabby cat",
    "two kids", "chef", "couple", "modern house", "family", "horse", "bowl of soup",
    "stack of books", "leather sofa", "cute kitten", "teenager", "airplane",
]  # fmt: skip
ACTIONS = [
    "sitting", "standing", "sleeping", "lying", "walking", "smiling", "holding an umbrella",
    "wearing a red jacket", "eating pizza", "parked", "resting", "posing for a photo", "",
]  # fmt: skip
PLACES = [
    "on the beach", "in a forest", "next to a lake", "near the river", "at night",
    "under a tree", "in the city", "on a busy street", "in front of a church",
    "on top of a hill", "at sunset", "in the snow", "on a couch", "in a modern kitchen",
    "beside the road", "in Paris", "at the Golden Gate Bridge", "",
]  # fmt: skip
FRAMES = [
    "{}", "A {}", "a {}", "A photo of a {}", "Photo of {}", "an image of a {}", "{}.",
    "Close-up of a {}", "{} - stock photo", "Aerial view of a {}", "{}!", "The {}",
    "#{} #travel", "{} (2019)",
]  # fmt: skip
NO_TABLE = [
    "IMG_2041.JPG", "Jane Doe", "2019", "Toyota Corolla", "Untitled", "Golden Gate Bridge",
    "東京の夜景", "Q3 revenue chart", "Mona Lisa, Louvre", "Abstract", "Fig. 3", "😀😀",
]  # fmt: skip


def make_captions(n: int, seed: int = 0) -> list[str]:
    """Captions in the shapes web alt-text takes: plain, framed, titled, tagged, some with no
    word in the synonym table."""
    rng = random.Random(seed)
    captions = []
    for i in range(n):
        if i % 25 == 0:
            captions.append(rng.choice(NO_TABLE))
            continue
        body = " ".join(p for p in (rng.choice(SUBJECTS), rng.choice(ACTIONS)) if p)
        place = rng.choice(PLACES)
        body = f"{body} {place}" if place else body
        caption = rng.choice(FRAMES).format(body)
        if i % 7 == 0:
            caption = caption[:1].upper() + caption[1:]
        if i % 31 == 0:
            caption = caption.upper()
        if i % 13 == 0:
            caption = caption.title()
        captions.append(caption)
    return captions


CAPTIONS = make_captions(500)


def test_rules_tables_are_sane() -> None:
    assert re.fullmatch(r"[0-9a-f]{12}", RULES_VERSION)
    assert len(SYNONYMS) >= 150
    for key, options in SYNONYMS.items():
        assert key == key.lower().strip() and options, key
        assert len(set(options)) == len(options), key
        for option in options:
            assert option == option.lower() and option.strip() == option
            assert option != key and "\n" not in option, key
            # one substitution never adds more tokens than FRAME_MARGIN
            assert clip_token_count(option) - clip_token_count(key) <= FRAME_MARGIN, option
    for group in LEAD_FRAMES:
        for frame in group:
            assert max(clip_token_count(f) for f in group) - clip_token_count(frame) <= 4
    for frame in ADDED_FRAMES:
        assert clip_token_count(frame.format("dog")) - 1 <= FRAME_MARGIN


def test_rules_rewrite_deterministic_and_one_line() -> None:
    for caption in CAPTIONS[:60]:
        a = rules_rewrite(caption, uid="u7", index=1, seed=3)
        assert a == rules_rewrite(caption, uid="u7", index=1, seed=3)
        assert "\n" not in a and "\r" not in a and a == a.strip()
    tricky = "a big dog\non the\tbeach\r\n"
    out = rules_rewrite(tricky, uid="u", index=0, seed=0)
    assert "\n" not in out and "\t" not in out and "\r" not in out


def test_rules_rewrite_varies_with_uid_seed_index() -> None:
    caption = "A beautiful old house near the beach at sunset"
    outs = {rules_rewrite(caption, uid=f"u{i}", index=0, seed=0) for i in range(20)}
    assert len(outs) >= 8
    outs = {rules_rewrite(caption, uid="u", index=0, seed=s) for s in range(20)}
    assert len(outs) >= 8
    by_index = [rules_rewrite(caption, uid="u", index=i, seed=0) for i in range(DISTINCT_INDEXES)]
    assert len(set(by_index)) == DISTINCT_INDEXES


def test_rules_rewrite_distinct_indexes_on_generated_captions() -> None:
    repeats = []
    for n, caption in enumerate(CAPTIONS[:200]):
        outs = [rules_rewrite(caption, uid=f"id{n}", index=i, seed=0) for i in range(4)]
        if len(set(outs)) < 4:
            repeats.append((caption, outs))
    assert not repeats, repeats[:5]


def test_rules_rewrite_passes_check_on_generated_captions() -> None:
    failures = []
    for n, caption in enumerate(CAPTIONS):
        for index in (0, 1):
            out = rules_rewrite(caption, uid=f"id{n}", index=index, seed=0)
            reason = check_rewrite(caption, out)
            if reason is not None:
                failures.append((reason, caption, out))
    # report which fail (pytest shows the list when the assertion trips)
    assert len(failures) <= 0.01 * 2 * len(CAPTIONS), failures


def test_rules_rewrite_differs_on_random_strings() -> None:
    rng = random.Random(42)
    alphabet = "abcdefghijklmnopqrstuvwxyz ABCDEFG .,!?'\"-#@0123456789éü東京😀\n\t"
    for n in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 60)))
        if not text.split():
            assert rules_rewrite(text, uid="r", index=0, seed=0) == ""
            continue
        for index in (0, 3, 1000):
            out = rules_rewrite(text, uid=f"r{n}", index=index, seed=1)
            assert check_rewrite(text, out) not in ("empty", "identical", "multi_line"), (
                text,
                out,
            )


def test_rules_rewrite_keeps_case_punctuation_and_names() -> None:
    caption = "A big dog sitting next to an old car."
    outs = [rules_rewrite(caption, uid="x", index=i, seed=0) for i in range(8)]
    for out in outs:
        assert out[0].isupper() and out.endswith(".")
        assert " an big" not in out and " a aged" not in out and " a old" not in out
    assert any("an aged car" in out for out in outs) or all("old car" in o for o in outs)
    lower = [rules_rewrite("big dog on the beach", uid="x", index=i, seed=0) for i in range(4)]
    assert all(out[0].islower() for out in lower)
    names = "New York skyline from the Big Apple Hotel"
    for i in range(6):
        out = rules_rewrite(names, uid="x", index=i, seed=0)
        assert "New York " in out and "Big Apple Hotel" in out
    shouted = rules_rewrite("BIG DOG ON THE BEACH", uid="x", index=0, seed=0)
    assert shouted == shouted.upper() and shouted != "BIG DOG ON THE BEACH"
    assert "Jane Doe" in rules_rewrite("Jane Doe", uid="x", index=0, seed=0)


def test_rules_rewrite_frames() -> None:
    out = rules_rewrite("A photo of Mount Fuji", uid="x", index=0, seed=0)
    assert out.endswith(" Mount Fuji") and not out.startswith("A photo of")
    assert out.split(" Mount")[0].lower() in {f for group in LEAD_FRAMES for f in group}
    plain = {rules_rewrite("Mount Fuji", uid="x", index=i, seed=0) for i in range(4)}
    assert plain == {
        "An image of Mount Fuji",
        "A picture of Mount Fuji",
        "An image showing Mount Fuji",
        "Mount Fuji, in a picture",
    }
    shouted = {rules_rewrite("Mount Fuji!", uid="x", index=i, seed=0) for i in range(4)}
    assert "Mount Fuji, in a picture!" in shouted


LEAD_WORDS = {frame.split()[0] for group in LEAD_FRAMES for frame in group}


@pytest.mark.parametrize(
    ("caption", "index", "expected"),
    [
        ("A Photo Of A Group Of Friends", 0, "An Image Of A Group Of Friends"),
        ("A PHOTO OF A DOG", 2, "AN IMAGE OF A DOG"),
        ("A HUGE DOG", 0, "AN ENORMOUS CANINE"),
        ("東京の夜景", 0, "a picture of 東京の夜景"),
        ("The Old Town Hall", 0, "A picture of The Old Town Hall"),
        ("The dog at night", 0, "The pooch at nighttime"),
        ("#sunset #beach", 0, "a picture of #sunset #beach"),
    ],
)
def test_rules_rewrite_examples(caption: str, index: int, expected: str) -> None:
    # pinned outputs: a change here changes cached rewrites, so bump the rules algorithm
    assert rules_rewrite(caption, uid="a", index=index, seed=0) == expected


def test_rules_rewrite_token_limits() -> None:
    rng = random.Random(5)
    words = [w for key in SYNONYMS for w in key.split()] + ["zebra", "Jane", "42", ","]
    near_limit = 0
    for n in range(150):
        length = rng.randint(40, 90)
        caption = " ".join(rng.choice(words) for _ in range(length))
        tokens = clip_token_count(caption)
        for index in (0, 2):
            out = rules_rewrite(caption, uid=f"t{n}", index=index, seed=0)
            assert check_rewrite(caption, out) not in ("empty", "identical", "multi_line")
            if tokens <= MAX_CLIP_TOKENS - FRAME_MARGIN:
                assert clip_token_count(out) <= MAX_CLIP_TOKENS, (caption, out)
                near_limit += tokens > MAX_CLIP_TOKENS - 15
            elif tokens > MAX_CLIP_TOKENS and caption.split()[0] not in LEAD_WORDS:
                # substitution only: no frame added
                assert not any(out.startswith(f.split("{}")[0]) for f in ADDED_FRAMES[:3])
                assert not out.endswith(", in a picture")
    assert near_limit > 20  # the interesting range was exercised


def test_rules_rewrite_no_table_words_within_limit() -> None:
    caption = " ".join(["zebra"] * (MAX_CLIP_TOKENS - FRAME_MARGIN))
    for index in range(4):
        out = rules_rewrite(caption, uid="z", index=index, seed=0)
        assert out != caption and clip_token_count(out) <= MAX_CLIP_TOKENS


def test_rules_rewrite_edge_inputs() -> None:
    assert rules_rewrite("", uid="x", index=0, seed=0) == ""
    assert rules_rewrite(" \n\t", uid="x", index=0, seed=0) == ""
    with pytest.raises(ValueError, match="index"):
        rules_rewrite("a dog", uid="x", index=-1, seed=0)
    far = rules_rewrite("a big dog", uid="x", index=3005, seed=0)
    assert far != "a big dog" and far == rules_rewrite("a big dog", uid="x", index=3005, seed=0)
