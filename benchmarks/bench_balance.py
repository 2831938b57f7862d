"""Throughput of MetaCLIP sub-string matching (`curate.balancing.matching.Matcher`) against the
naive loop of MetaCLIP's original code, plus build time and memory of a 500k-entry automaton.

Data (synthetic, seeded, no downloads): a vocabulary of pseudo-words (letters drawn with English
letter frequencies, 2-12 letters, ~15% capitalised, frequent words shorter) with a Zipf-like
frequency (weight 1 / rank^s). Metadata entries are distinct: every vocabulary word as a unigram,
then bigrams (70%) and trigrams (30%) of Zipf-drawn words, with a few hyphenated bigrams and
abbreviations ending in "." (which can never match under MetaCLIP's rules); a smaller entry list is
a prefix of a larger one. Captions are 5-25 Zipf-drawn words with marks (, . : ! ?) attached to
some words, an occasional hyphenated pair, and a final mark half of the time.

Throughput: the reference is MetaCLIP's original matching, a loop over all entries checking
`" " + entry + " " in pad_text(caption)` (spaced entries prepared once, outside the timing, as
MetaCLIP caches them; a list comprehension, slightly faster than MetaCLIP's explicit loop). It
costs one `in` per entry per caption, so it is timed on the first `--naive-captions` captions
only; `Matcher.match` is timed on all `--captions`, looping over them until one timing lasts
0.2 s (also on the naive loop's captions, informational; on a few dozen captions the automaton
stays in cache and looks faster than it is). Both run in the same process, alternating
order over `--repeats` rounds; medians are reported. Every caption the naive loop ran on must
give the IDENTICAL match set (the script exits non-zero otherwise). Target: automaton captions/s
÷ naive captions/s ≥ 100. `words` mode (case-folded, Unicode word boundaries) on the same entries
is timed for information.

Build: a fresh subprocess generates `--build-entries` entries and the captions, then builds
`Matcher(entries)`: build seconds, peak RSS above the RSS before the build (high-water mark reset
through /proc/self/clear_refs on Linux; `ru_maxrss` difference otherwise, which can only
underestimate), RSS still held after the build, and matching throughput with that automaton
(checked against the naive loop on `--build-check-captions` captions).

    python benchmarks/bench_balance.py --entries 100000 --captions 2000 --naive-captions 200 \\
        --build-entries 500000 --repeats 5
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

from peak_memory import peak_rss

from curate.balancing.matching import Matcher, pad_text

MIN_SECONDS = 0.2  # shortest timing of a fast side (it loops over its captions)

# English letter frequencies (%), so pseudo-words share prefixes the way real words do.
LETTERS = "etaoinshrdlcumwfgypbvkjxqz"
LETTER_WEIGHTS = [
    12.7, 9.1, 8.2, 7.5, 7.0, 6.7, 6.3, 6.1, 6.0, 4.3, 4.0, 2.8, 2.8,
    2.4, 2.4, 2.2, 2.0, 2.0, 1.9, 1.5, 1.0, 0.8, 0.2, 0.2, 0.1, 0.1,
]  # fmt: skip
WORD_LENGTHS = range(2, 13)
WORD_LENGTH_WEIGHTS = [3, 6, 10, 12, 12, 11, 9, 7, 5, 3, 2]
INNER_MARKS = [",", ".", ":", "!", "?"]
INNER_MARK_WEIGHTS = [6, 2, 1, 0.5, 0.5]
FINAL_MARKS = [".", "!", "?"]


def make_vocab(rng: random.Random, size: int, capital: float = 0.15) -> list[str]:
    """Distinct pseudo-words in rank order (rank 0 is the most frequent; frequent words are
    shorter on average, as in natural language)."""
    seen: set[str] = set()
    words: list[str] = []
    while len(words) < size:
        (length,) = rng.choices(WORD_LENGTHS, WORD_LENGTH_WEIGHTS)
        word = "".join(rng.choices(LETTERS, LETTER_WEIGHTS, k=length))
        if rng.random() < capital:
            word = word.capitalize()
        if word not in seen:
            seen.add(word)
            words.append(word)
    jitter = {word: len(word) + 4 * rng.random() for word in words}
    words.sort(key=jitter.__getitem__)
    return words


def zipf_cum_weights(size: int, exponent: float) -> list[float]:
    return list(itertools.accumulate(1.0 / (rank + 1) ** exponent for rank in range(size)))


def make_entries(
    rng: random.Random, vocab: list[str], cum: list[float], count: int
) -> tuple[list[str], dict[str, int]]:
    """`count` distinct entries: the vocabulary as unigrams (shuffled), then Zipf-drawn n-grams.
    The list for a smaller `count` (same seed) is a prefix of the list for a larger one."""
    unigrams = list(vocab)
    rng.shuffle(unigrams)
    entries = unigrams[:count]
    kinds = {"unigram": len(entries), "bigram": 0, "trigram": 0, "hyphenated": 0, "abbrev": 0}
    seen = set(entries)
    while len(entries) < count:
        roll = rng.random()
        if roll < 0.005:
            kind, entry = "abbrev", rng.choices(vocab, cum_weights=cum)[0] + "."
        elif roll < 0.015:
            kind, entry = "hyphenated", "-".join(rng.choices(vocab, cum_weights=cum, k=2))
        elif roll < 0.7:
            kind, entry = "bigram", " ".join(rng.choices(vocab, cum_weights=cum, k=2))
        else:
            kind, entry = "trigram", " ".join(rng.choices(vocab, cum_weights=cum, k=3))
        if entry not in seen:
            seen.add(entry)
            entries.append(entry)
            kinds[kind] += 1
    return entries, kinds


def make_captions(rng: random.Random, vocab: list[str], cum: list[float], count: int) -> list[str]:
    captions = []
    for _ in range(count):
        words = rng.choices(vocab, cum_weights=cum, k=rng.randint(5, 25))
        parts = []
        for i, word in enumerate(words):
            roll = rng.random()
            if roll < 0.06 and i < len(words) - 1:
                word += rng.choices(INNER_MARKS, INNER_MARK_WEIGHTS)[0]
            elif roll < 0.08:
                word += "-" + rng.choices(vocab, cum_weights=cum)[0]
            parts.append(word)
        caption = " ".join(parts)
        if rng.random() < 0.5:
            caption += rng.choice(FINAL_MARKS)
        captions.append(caption)
    return captions


def make_data(
    args: argparse.Namespace, entries: int
) -> tuple[list[str], dict[str, int], list[str]]:
    """Entries and captions, from one seed (the same captions whatever `entries` is)."""
    vocab = make_vocab(random.Random(args.seed), args.vocab)
    cum = zipf_cum_weights(len(vocab), args.zipf)
    captions = make_captions(random.Random(args.seed + 1), vocab, cum, args.captions)
    entry_list, kinds = make_entries(random.Random(args.seed + 2), vocab, cum, entries)
    return entry_list, kinds, captions


def naive_match(spaced_entries: Sequence[str], text: str) -> list[int]:
    """MetaCLIP's original matching: one sub-string check per entry."""
    padded = pad_text(text)
    return [i for i, entry in enumerate(spaced_entries) if entry in padded]


def run_all(fn: Callable[[str], list[int]], captions: Sequence[str]) -> list[list[int]]:
    return [fn(caption) for caption in captions]


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def check_identical(
    captions: Sequence[str], expected: list[list[int]], got: list[list[int]], entries: list[str]
) -> int:
    """Exit non-zero at the first caption whose match sets differ; returns matches compared."""
    for caption, want, have in zip(captions, expected, got, strict=True):
        if want != have:
            missing = [entries[i] for i in sorted(set(want) - set(have))][:10]
            extra = [entries[i] for i in sorted(set(have) - set(want))][:10]
            raise SystemExit(
                f"MATCH SETS DIFFER for caption {caption!r}: "
                f"missing (naive only) {missing}, extra (automaton only) {extra}"
            )
    return sum(len(m) for m in expected)


def comparison(args: argparse.Namespace) -> dict[str, object]:
    entries, kinds, captions = make_data(args, args.entries)
    subset = captions[: args.naive_captions]
    spaced = [f" {entry} " for entry in entries]

    build_s = {}
    t0 = time.perf_counter()
    matcher = Matcher(entries)
    build_s["metaclip"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    words = Matcher(entries, "words")
    build_s["words"] = time.perf_counter() - t0

    # Correctness first (also warms both sides up).
    expected = run_all(lambda text: naive_match(spaced, text), subset)
    compared = check_identical(subset, expected, run_all(matcher.match, subset), entries)
    all_matches = run_all(matcher.match, captions)

    def looped(fn: Callable[[str], list[int]], texts: Sequence[str]) -> tuple[Callable, int]:
        # Fast sides go over their captions several times, so one timing lasts >= MIN_SECONDS.
        loops = max(1, math.ceil(MIN_SECONDS / max(timed(lambda: run_all(fn, texts)), 1e-9)))
        return (lambda: [run_all(fn, texts) for _ in range(loops)]), len(texts) * loops

    sides: dict[str, tuple[Callable[[], object], int]] = {
        "naive": (lambda: run_all(lambda t: naive_match(spaced, t), subset), len(subset)),
        "automaton": looped(matcher.match, captions),
        "automaton_naive_subset": looped(matcher.match, subset),
        "words": looped(words.match, captions),
    }
    times: dict[str, list[float]] = {name: [] for name in sides}
    for repeat in range(args.repeats):
        order = list(sides) if repeat % 2 == 0 else list(reversed(sides))
        for name in order:
            times[name].append(timed(sides[name][0]))
    median = {name: statistics.median(t) for name, t in times.items()}
    per_s = {name: sides[name][1] / median[name] for name in sides}
    return {
        "data": {
            "vocab": args.vocab,
            "zipf_exponent": args.zipf,
            "seed": args.seed,
            "entries": len(entries),
            "entry_kinds": kinds,
            "captions": len(captions),
            "mean_caption_chars": round(statistics.mean(map(len, captions)), 1),
            "mean_matches_per_caption": round(statistics.mean(map(len, all_matches)), 2),
            "example_caption": captions[0],
        },
        "build_seconds": {k: round(v, 3) for k, v in build_s.items()},
        "patterns": {"metaclip": matcher.patterns, "words": words.patterns},
        "naive_captions": len(subset),
        "identical_match_sets": True,
        "compared_captions": len(subset),
        "compared_matches": compared,
        "repeats": args.repeats,
        "captions_per_timing": {k: v[1] for k, v in sides.items()},
        "seconds_median": {k: round(v, 4) for k, v in median.items()},
        "seconds_all": {k: [round(x, 4) for x in v] for k, v in times.items()},
        "captions_per_s": {k: round(v, 1) for k, v in per_s.items()},
        "ratio": round(per_s["automaton"] / per_s["naive"], 1),
        "ratio_same_captions": round(per_s["automaton_naive_subset"] / per_s["naive"], 1),
        "target": 100,
    }


def build_child(args: argparse.Namespace) -> None:
    """In a fresh process: build time, memory and throughput of the `--build-entries` matcher."""
    entries, kinds, captions = make_data(args, args.build_entries)
    with peak_rss() as memory:
        t0 = time.perf_counter()
        matcher = Matcher(entries)
        build_s = time.perf_counter() - t0

    check = captions[: args.build_check_captions]
    spaced = [f" {entry} " for entry in entries]
    expected = run_all(lambda text: naive_match(spaced, text), check)
    compared = check_identical(check, expected, run_all(matcher.match, check), entries)
    loops = max(1, math.ceil(MIN_SECONDS / timed(lambda: run_all(matcher.match, captions))))
    times = [
        timed(lambda: [run_all(matcher.match, captions) for _ in range(loops)]) / loops
        for _ in range(args.repeats)
    ]
    median = statistics.median(times)
    result: dict[str, object] = {
        "entries": len(entries),
        "entry_kinds": kinds,
        "patterns": matcher.patterns,
        "build_seconds": round(build_s, 3),
        "ru_maxrss_increase_mb": round(memory.ru_maxrss_increase_mb, 1),
        "captions": len(captions),
        "seconds_per_pass_median": round(median, 4),
        "seconds_per_pass_all": [round(x, 4) for x in times],
        "captions_per_s": round(len(captions) / median, 1),
        "checked_captions": len(check),
        "checked_matches": compared,
        "mean_matches_per_caption": round(
            statistics.mean(map(len, run_all(matcher.match, captions))), 2
        ),
    }
    if memory.base_mb is not None and memory.retained_mb is not None:
        result["rss_before_build_mb"] = round(memory.base_mb, 1)
        result["rss_retained_mb"] = round(memory.retained_mb, 1)
    result["peak_rss_increase_mb"] = round(memory.peak_increase_mb, 1)
    print(json.dumps(result))


def build(args: argparse.Namespace) -> dict[str, object]:
    command = [
        sys.executable,
        os.path.abspath(__file__),
        "--build-child",
        *("--build-entries", str(args.build_entries)),
        *("--captions", str(args.captions)),
        *("--vocab", str(args.vocab)),
        *("--zipf", str(args.zipf)),
        *("--seed", str(args.seed)),
        *("--repeats", str(args.repeats)),
        *("--build-check-captions", str(args.build_check_captions)),
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"build measurement failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def summary(result: dict[str, object]) -> str:
    lines = []
    cmp = result.get("comparison")
    if isinstance(cmp, dict):
        cps = cmp["captions_per_s"]
        lines += [
            f"{cmp['data']['entries']:,} entries, {cmp['data']['captions']:,} captions "
            f"({cmp['data']['mean_matches_per_caption']} matches/caption)",
            f"  naive loop ({cmp['naive_captions']} captions): {cps['naive']:>12,.1f} captions/s",
            f"  Matcher metaclip:            {cps['automaton']:>12,.1f} captions/s  "
            f"ratio {cmp['ratio']:,.1f}x (target >= {cmp['target']}), "
            f"identical on {cmp['compared_captions']} captions",
            f"  Matcher words (info):        {cps['words']:>12,.1f} captions/s",
            f"  build: metaclip {cmp['build_seconds']['metaclip']} s, "
            f"words {cmp['build_seconds']['words']} s",
        ]
    big = result.get("build")
    if isinstance(big, dict):
        lines += [
            f"{big['entries']:,} entries: build {big['build_seconds']} s, peak RSS "
            f"+{big['peak_rss_increase_mb']} MB, retained +{big.get('rss_retained_mb')} MB, "
            f"{big['captions_per_s']:,.1f} captions/s",
        ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=100_000, help="entries for the comparison")
    parser.add_argument("--captions", type=int, default=2000, help="captions for the automaton")
    parser.add_argument("--naive-captions", type=int, default=200, help="captions for the loop")
    parser.add_argument("--build-entries", type=int, default=500_000, help="entries for build")
    parser.add_argument("--build-check-captions", type=int, default=20)
    parser.add_argument("--vocab", type=int, default=30_000, help="pseudo-words")
    parser.add_argument("--zipf", type=float, default=1.0, help="Zipf exponent of word frequency")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-comparison", action="store_true")
    parser.add_argument("--skip-build", action="store_true")
    parser.add_argument("--build-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build_child:
        build_child(args)
        return
    result: dict[str, object] = {
        "benchmark": "balance",
        "cpu_count": os.cpu_count(),
        "load_avg_1min_before": round(os.getloadavg()[0], 2),
    }
    t0 = time.perf_counter()
    if not args.skip_comparison:
        result["comparison"] = comparison(args)
    if not args.skip_build:
        result["build"] = build(args)
    result["load_avg_1min_after"] = round(os.getloadavg()[0], 2)
    result["total_seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(result))
    print(summary(result), file=sys.stderr)


if __name__ == "__main__":
    main()
