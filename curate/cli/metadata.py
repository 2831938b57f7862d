"""`curate metadata build|check`: make and inspect MetaCLIP-style metadata (entry lists)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from curate.balancing.build import PmiUnit
from curate.balancing.matching import MatchMode
from curate.cli import options as opt
from curate.cli.report import metadata_build_summary, print_json, stdout_console
from curate.errors import InputError

metadata_app = typer.Typer(
    name="metadata",
    help="Build and check metadata (the entry list `curate balance` matches captions against).",
    no_args_is_help=True,
    rich_markup_mode="rich",
)


def _corpus_captions(sources: list[str], caption_column: str | None) -> list[str]:
    """Captions of every usable sample of the corpus sources (failures are skipped)."""
    from curate.io.captions import read_unit, resolve_units

    captions: list[str] = []
    for unit in resolve_units(sources, caption_column):
        captions.extend(read_unit(unit)["caption"].drop_nulls().to_list())
    return captions


@metadata_app.command("build")
def build_command(
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            "-o",
            help="Metadata file to write: .json (MetaCLIP's format, a JSON list) or .txt.",
            show_default=False,
        ),
    ],
    words: Annotated[
        list[Path] | None,
        typer.Option(
            "--words",
            help="Word list, one entry per line (e.g. article titles). Repeatable.",
            rich_help_panel="Sources",
        ),
    ] = None,
    wordnet: Annotated[
        str | None,
        typer.Option(
            "--wordnet",
            help="WordNet dict folder (data.noun, data.verb, ...; Debian's wordnet-base installs "
            "/usr/share/wordnet), or 'auto' to look in the usual places. Adds every synset as "
            "MetaCLIP does: nltk's synset name up to its first dot (dog.n.01 → dog; names are "
            "lowercase), underscores as spaces.",
            rich_help_panel="Sources",
        ),
    ] = None,
    corpus: Annotated[
        list[str] | None,
        typer.Option(
            "--corpus",
            help="Captions to mine n-grams from: shards, a run folder or parquet tables "
            "(e.g. the pool itself). Repeatable.",
            rich_help_panel="Sources",
        ),
    ] = None,
    corpus_text: Annotated[
        list[Path] | None,
        typer.Option(
            "--corpus-text",
            help="Plain text to mine n-grams from, one text per line. Repeatable.",
            rich_help_panel="Sources",
        ),
    ] = None,
    caption_column: opt.CaptionColumnOpt = None,
    min_unigram_count: Annotated[
        int,
        typer.Option(
            "--min-unigram-count",
            min=1,
            help="Mined words seen at least this often (MetaCLIP: 100 on Wikipedia).",
            rich_help_panel="N-grams",
        ),
    ] = 100,
    min_bigram_count: Annotated[
        int,
        typer.Option(
            "--min-bigram-count",
            min=1,
            help="Mined word pairs seen at least this often.",
            rich_help_panel="N-grams",
        ),
    ] = 5,
    min_bigram_pmi: Annotated[
        float,
        typer.Option(
            "--min-bigram-pmi",
            help="Mined word pairs with a PMI at least this, in --pmi-unit (MetaCLIP: 30 bits).",
            rich_help_panel="N-grams",
        ),
    ] = 30.0,
    pmi_unit: Annotated[
        PmiUnit,
        typer.Option(
            "--pmi-unit",
            help="Scale of --min-bigram-pmi. bits: log2 P(a b) / (P(a) P(b)), nltk's PMI as "
            "MetaCLIP uses it, every P over the token count. ratio: P(a b) / (P(a) P(b)) "
            "itself (30 bits = a ratio of 2^30).",
            rich_help_panel="N-grams",
        ),
    ] = PmiUnit.bits,
    numbers: Annotated[
        bool,
        typer.Option(
            "--numbers/--no-numbers",
            help="Start from the entries 0 .. 99, as MetaCLIP's build does.",
            rich_help_panel="Sources",
        ),
    ] = True,
    as_json: opt.JsonOpt = False,
) -> None:
    """Build metadata from offline sources, in this order: the numbers 0 .. 99, WordNet synset
    names, word lists, mined unigrams, mined bigrams. As in MetaCLIP's build, blank entries and
    entries that are one punctuation character (! # - ...) are skipped; each entry is kept once
    (its first source wins); the table shows what every source added.
    """
    from curate.balancing.build import (
        NUMBER_ENTRIES,
        find_wordnet,
        merge_sources,
        mine_ngrams,
        read_word_list,
        read_wordnet,
    )
    from curate.balancing.metadata import save_metadata, unmatchable

    sources: list[tuple[str, list[str]]] = []
    if wordnet is not None:
        folder = find_wordnet() if wordnet == "auto" else Path(wordnet)
        if folder is None:
            raise InputError(
                "--wordnet auto: no WordNet database found (install wordnet-base, set WNHOME, "
                "or give the dict folder)"
            )
        sources.append((f"wordnet {folder}", read_wordnet(folder)))
    for path in words or []:
        sources.append((f"words {path}", read_word_list(path)))
    texts: list[str] = []
    if corpus:
        texts.extend(_corpus_captions(corpus, caption_column))
    for path in corpus_text or []:
        if not path.is_file():
            raise InputError(f"--corpus-text {path} does not exist")
        texts.extend(path.read_text(encoding="utf-8", errors="replace").splitlines())
    if corpus or corpus_text:
        mined = mine_ngrams(
            texts,
            min_unigram_count=min_unigram_count,
            min_bigram_count=min_bigram_count,
            min_bigram_pmi=min_bigram_pmi,
            pmi_unit=pmi_unit,
        )
        sources.append((f"unigrams (count ≥ {min_unigram_count})", mined.unigrams))
        unit = " bits" if pmi_unit is PmiUnit.bits else " (ratio)"
        sources.append((f"bigrams (PMI ≥ {min_bigram_pmi:g}{unit})", mined.bigrams))
    if not sources:
        raise InputError("no source given: use --words, --wordnet or --corpus/--corpus-text")
    if numbers:
        sources.insert(0, ("numbers 0-99", list(NUMBER_ENTRIES)))
    entries, counts = merge_sources(sources)
    if not any(c.read - c.blank - c.punctuation for c in counts if c.name != "numbers 0-99"):
        raise InputError(
            "the sources gave no entries (for a small corpus, lower --min-unigram-count and "
            "--min-bigram-count)"
        )
    sha = save_metadata(out, entries)
    never = len(unmatchable(entries, MatchMode.metaclip))
    if as_json:
        print_json(
            {
                "out": str(out),
                "entries": len(entries),
                "sha256": sha,
                "unmatchable_metaclip": never,
                "sources": [vars(c) for c in counts],
            }
        )
    else:
        metadata_build_summary(len(entries), counts, out, never)


@metadata_app.command("check")
def check_command(
    metadata: Annotated[
        Path, typer.Argument(help="Metadata file (.json list or .txt).", show_default=False)
    ],
    match: Annotated[
        MatchMode, typer.Option("--match", help="Matching mode to check against.")
    ] = MatchMode.metaclip,
    show: Annotated[int, typer.Option("--show", min=0, help="Unmatchable entries to list.")] = 20,
    as_json: opt.JsonOpt = False,
) -> None:
    """Validate metadata (errors for empty, blank, duplicate or non-string entries) and list the
    entries that can never match under --match.
    """
    from curate.balancing.metadata import load_metadata, unmatchable

    meta = load_metadata(metadata)
    never = unmatchable(meta.entries, match)
    if as_json:
        print_json(
            {
                "metadata": str(metadata),
                "entries": meta.size,
                "sha256": meta.sha256,
                "unmatchable": [meta.entries[i] for i in never],
            }
        )
        return
    stdout_console.print(
        f"{metadata}: {meta.size} entries, sha256 {meta.sha256[:16]}…; {len(never)} can never "
        f"match with --match {match.value}",
        highlight=False,
        soft_wrap=True,
    )
    for i in never[:show]:
        stdout_console.print(f"  {i}: {meta.entries[i]!r}", highlight=False)
