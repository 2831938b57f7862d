"""Rewrite prompts: an instruction plus in-context `source => target` examples (LaCLIP-style).

A prompt file is JSON::

    {"instruction": "...", "k": 3,
     "banks": {"concise": [["source caption", "rewritten caption"], ...], ...}}

Every rewrite of a caption picks one style (bank) and `k` example pairs from it, seeded by
``(seed, uid, rewrite index)``: the same sample always gets the same prompt, and its several
rewrites get different examples, which is where LaCLIP's diversity comes from. `k` may be 0
(instruction only). The packaged default (`prompt_data/default.json`) has four styles.

`PromptTemplate.version` hashes the content (not the path), so a cache keyed on it is invalidated
exactly when the instruction, `k` or an example changes.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from curate.errors import InputError, brief
from curate.io.text_files import read_text_file

__all__ = [
    "DEFAULT_PROMPTS",
    "PROMPT_FORMAT",
    "PromptTemplate",
    "build_chat_messages",
    "build_completion_prompt",
    "choose_examples",
    "load_prompts",
    "one_line",
]

PROMPT_FORMAT = 1
DEFAULT_PROMPTS = "default"  # `PromptTemplate.source` of the packaged prompts
_DEFAULT_RESOURCE = "prompt_data/default.json"
_KEYS = ("instruction", "k", "banks")
_ARROW = "=>"

# Characters that end a line for str.splitlines(), plus tabs: none may appear inside an example,
# and the caption put into a prompt has them replaced by spaces.
_BREAKS = "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"
_BREAK_RE = re.compile(r"\r\n|[\t" + _BREAKS + "]")


@dataclass(frozen=True)
class PromptTemplate:
    """A validated prompt file. `banks` maps style name to its (source, target) example pairs."""

    instruction: str
    k: int
    banks: dict[str, tuple[tuple[str, str], ...]] = field(hash=False)
    source: str = field(default=DEFAULT_PROMPTS, compare=False)

    @property
    def styles(self) -> tuple[str, ...]:
        """Style names in the order sampling uses (sorted)."""
        return tuple(sorted(self.banks))

    @property
    def version(self) -> str:
        """First 16 hex digits of sha256 over the canonical JSON of the content and format."""
        payload = {
            "instruction": self.instruction,
            "k": self.k,
            "banks": {name: [list(pair) for pair in pairs] for name, pairs in self.banks.items()},
            "format": PROMPT_FORMAT,
        }
        text = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def one_line(text: str) -> str:
    """`text` on one line: line breaks and tabs become spaces, the ends are stripped."""
    return _BREAK_RE.sub(" ", text).strip()


def load_prompts(path: Path | str | None = None) -> PromptTemplate:
    """Read and validate a prompt file; None loads the packaged default."""
    if path is None:
        resource = resources.files("curate.rewriting").joinpath(_DEFAULT_RESOURCE)
        return _parse(resource.read_text(encoding="utf-8"), DEFAULT_PROMPTS)
    name = os.fspath(path)
    return _parse(read_text_file(name, "prompt file"), name)


def _parse(text: str, source: str) -> PromptTemplate:
    def fail(problem: str) -> InputError:
        return InputError(one_line(f"prompt file {source}: {problem}"))

    try:
        data: Any = json.loads(text)
    except RecursionError:
        raise fail("nested too deeply") from None
    except ValueError as exc:
        raise fail(f"not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise fail(f"must hold a JSON object, not {_json_type(data)}")
    unknown = sorted(set(data) - {*_KEYS, "format"})
    if unknown:
        shown = ", ".join(brief(key, 60) for key in unknown[:5])
        raise fail(f"unknown key(s) {shown}; expected {', '.join(_KEYS)}")
    missing = [key for key in _KEYS if key not in data]
    if missing:
        raise fail(f"missing key(s) {', '.join(missing)}")
    if "format" in data and data["format"] != PROMPT_FORMAT:
        raise fail(f"format {brief(data['format'])} is not supported (this version reads format 1)")

    instruction = data["instruction"]
    if not isinstance(instruction, str) or not instruction.strip():
        raise fail("instruction must be a non-empty string")
    k = data["k"]
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise fail(f"k must be an integer >= 0, not {brief(k)}")

    raw_banks = data["banks"]
    if not isinstance(raw_banks, dict) or not raw_banks:
        raise fail("banks must be a non-empty object mapping a style name to example pairs")
    banks: dict[str, tuple[tuple[str, str], ...]] = {}
    for style, raw_pairs in raw_banks.items():
        if not style.strip() or _has_break(style):
            raise fail(f"style name {brief(style)} must be non-empty and on one line")
        if not isinstance(raw_pairs, list) or not raw_pairs:
            raise fail(f"bank {brief(style)} must be a non-empty list of [source, target] pairs")
        pairs = []
        for number, pair in enumerate(raw_pairs, 1):
            where = f"bank {brief(style)} pair {number}"
            if (
                not isinstance(pair, list)
                or len(pair) != 2
                or not all(isinstance(s, str) for s in pair)
            ):
                raise fail(f"{where} must be a list of two strings [source, target]")
            for side, value in zip(("source", "target"), pair, strict=True):
                if not value.strip():
                    raise fail(f"{where} has an empty {side}")
                if _has_break(value):
                    raise fail(f"{where} has a line break or tab in its {side}")
                if _ARROW in value:
                    raise fail(f"{where} has {_ARROW!r} in its {side}; it separates the pair")
            pairs.append((pair[0].strip(), pair[1].strip()))
        banks[style] = tuple(pairs)
    smallest = min(banks, key=lambda name: (len(banks[name]), name))
    if k > len(banks[smallest]):
        raise fail(f"k={k} but bank {brief(smallest)} has only {len(banks[smallest])} pair(s)")
    return PromptTemplate(instruction.strip(), k, banks, source)


def _has_break(text: str) -> bool:
    return _BREAK_RE.search(text) is not None


def _json_type(value: Any) -> str:
    names = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


def _below(rng: random.Random, n: int) -> int:
    # Built on Random.random() alone: its sequence for a given int seed is guaranteed stable
    # across Python versions, unlike choice()/sample(), so prompts (and caches) stay put.
    return min(int(rng.random() * n), n - 1)


def _rng(seed: int, uid: str, index: int) -> random.Random:
    digest = hashlib.blake2b(f"{seed}:{uid}:{index}".encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(digest, "big"))


def choose_examples(
    template: PromptTemplate, *, uid: str, index: int, seed: int
) -> tuple[str, list[tuple[str, str]]]:
    """The style and `k` example pairs for rewrite `index` of sample `uid`.

    Deterministic in (seed, uid, index); the style is uniform over the banks, the pairs are
    drawn without replacement from that bank, in random order.
    """
    rng = _rng(seed, uid, index)
    styles = template.styles
    style = styles[_below(rng, len(styles))]
    pool = list(template.banks[style])
    for i in range(template.k):  # partial Fisher-Yates shuffle: the first k are the sample
        j = i + _below(rng, len(pool) - i)
        pool[i], pool[j] = pool[j], pool[i]
    return style, pool[: template.k]


def build_completion_prompt(
    template: PromptTemplate, caption: str, *, uid: str, index: int, seed: int
) -> str:
    """A completion prompt: the instruction, a blank line, `source => target` lines, `caption =>`.

    The last line is exactly ``f"{one_line(caption)} =>"``; a model continues it with the
    rewrite (stop generation at a newline).
    """
    _, pairs = choose_examples(template, uid=uid, index=index, seed=seed)
    lines = [template.instruction, ""]
    lines += [f"{source} {_ARROW} {target}" for source, target in pairs]
    lines.append(f"{one_line(caption)} {_ARROW}")
    return "\n".join(lines)


def build_chat_messages(
    template: PromptTemplate, caption: str, *, uid: str, index: int, seed: int
) -> list[dict[str, str]]:
    """Chat messages: the instruction as system, each example as a user/assistant turn, then
    the caption (on one line) as the last user message."""
    _, pairs = choose_examples(template, uid=uid, index=index, seed=seed)
    messages = [{"role": "system", "content": template.instruction}]
    for source, target in pairs:
        messages.append({"role": "user", "content": source})
        messages.append({"role": "assistant", "content": target})
    messages.append({"role": "user", "content": one_line(caption)})
    return messages
