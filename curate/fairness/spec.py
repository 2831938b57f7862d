"""Attribute specs: which demographic attributes to infer, their groups, caption terms and prompts.

A spec is a YAML or JSON file (see ``spec_data/default.yaml``, which ships perceived gender and
age group)::

    version: 1
    person: {terms: [...], prompts: [...], other_prompts: [...]}
    attributes:
      gender:
        groups:
          female: {terms: [...], prompts: [...]}
          male:   {terms: [...], prompts: [...]}
        target: {female: 0.5, male: 0.5}    # optional; default uniform
        swap: gender_swap.txt                # optional; for `curate rebalance --augment swap`

Loading is strict: every problem is one `InputError` line that names the file and the key.
YAML anchors and aliases (``&name``, ``*name``) are refused, so a small file cannot stand for a
huge one, and the file may be at most ``MAX_BYTES["attribute spec"]`` (4 MiB).
Attribute names become column names, so they are lower-case identifiers; ``mixed`` and
``unknown`` are reserved (a caption naming several groups is ``mixed``). A term may belong to one
group per attribute only (terms are compared case-insensitively, whitespace collapsed).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from curate.errors import InputError, brief
from curate.io.text_files import read_file_bytes

__all__ = ["Attribute", "AttributeSpec", "Group", "load_spec", "normalize_term"]

SPEC_VERSION = 1
RESERVED_GROUPS = ("mixed", "unknown")
# labels.parquet holds these columns, and <attribute><suffix> for every attribute.
RESERVED_COLUMNS = ("uid", "shard", "key", "caption", "error", "person", "concepts")
ATTRIBUTE_SUFFIXES = ("_caption", "_image", "_image_conf", "_source", "_image_prob")
_ATTRIBUTE_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_GROUP_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
_WORD_EDGE = re.compile(r"\w")  # caption terms start and end with one (word boundaries)


def normalize_term(term: str) -> str:
    """The form terms are compared in: lower case, runs of whitespace as one space."""
    return " ".join(term.lower().split())


@dataclass(frozen=True)
class Group:
    name: str
    terms: tuple[str, ...]
    prompts: tuple[str, ...]


@dataclass(frozen=True)
class Attribute:
    name: str
    description: str
    groups: tuple[Group, ...]
    target: tuple[float, ...]  # one share per group, sums to 1
    swap: Path | None  # swap table for counterfactual captions

    @property
    def group_names(self) -> tuple[str, ...]:
        return tuple(g.name for g in self.groups)

    @property
    def has_prompts(self) -> bool:
        return all(g.prompts for g in self.groups)

    @property
    def has_terms(self) -> bool:
        return any(g.terms for g in self.groups)


@dataclass(frozen=True)
class AttributeSpec:
    source: str  # the file, or "default"
    person_terms: tuple[str, ...]
    person_prompts: tuple[str, ...]
    other_prompts: tuple[str, ...]
    attributes: tuple[Attribute, ...]
    sha256: str

    def attribute(self, name: str) -> Attribute:
        for attribute in self.attributes:
            if attribute.name == name:
                return attribute
        known = ", ".join(a.name for a in self.attributes)
        raise InputError(f"attribute {name!r} is not in spec {self.source} (it has: {known})")

    def select(self, names: list[str] | None) -> AttributeSpec:
        """The spec restricted to `names` (all when None or empty), in the order given."""
        if not names:
            return self
        chosen = tuple(self.attribute(n) for n in dict.fromkeys(names))
        return AttributeSpec(
            self.source,
            self.person_terms,
            self.person_prompts,
            self.other_prompts,
            chosen,
            self.sha256,
        )

    def to_json(self) -> dict[str, Any]:
        """The resolved spec, as recorded in output folders."""
        return {
            "source": self.source,
            "sha256": self.sha256,
            "person": {
                "terms": list(self.person_terms),
                "prompts": list(self.person_prompts),
                "other_prompts": list(self.other_prompts),
            },
            "attributes": {
                a.name: {
                    "description": a.description,
                    "groups": {
                        g.name: {"terms": list(g.terms), "prompts": list(g.prompts)}
                        for g in a.groups
                    },
                    "target": dict(zip(a.group_names, a.target, strict=True)),
                    "swap": str(a.swap) if a.swap else None,
                }
                for a in self.attributes
            },
        }


def default_spec_path() -> Path:
    return Path(str(resources.files("curate.fairness") / "spec_data" / "default.yaml"))


def load_spec(path: str | Path | None = None) -> AttributeSpec:
    """Read and validate a spec; None reads the default (perceived gender and age group)."""
    file = default_spec_path() if path is None else Path(path).expanduser()
    label = "default" if path is None else str(file)
    raw_bytes = read_file_bytes(file, "attribute spec")
    try:
        text = raw_bytes.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{label}: not UTF-8 text") from exc
    data = _parse(text, file, label)
    return _build(data, file, label, hashlib.sha256(raw_bytes).hexdigest())


def _parse(text: str, file: Path, label: str) -> Any:
    try:
        if file.suffix.lower() == ".json":
            return _parse_json(text, label)
        return _parse_yaml(text, label)
    except RecursionError:
        raise InputError(f"{label}: nested too deeply") from None


def _parse_json(text: str, label: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{label}: invalid JSON at line {exc.lineno}: {exc.msg}") from exc
    except ValueError as exc:  # a number past Python's digit limit
        raise InputError(f"{label}: invalid JSON: {brief(str(exc), 120)}") from exc


def _parse_yaml(text: str, label: str) -> Any:
    import yaml

    class NoAliasLoader(yaml.SafeLoader):
        """SafeLoader that refuses anchors and aliases instead of sharing (expanding) nodes."""

        def compose_node(self, parent: Any, index: Any) -> Any:
            event = self.peek_event()
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
                problem = "anchors and aliases (&name, *name) are not allowed"
                raise yaml.composer.ComposerError(None, None, problem, event.start_mark)
            return super().compose_node(parent, index)

    try:
        return yaml.load(text, Loader=NoAliasLoader)  # a SafeLoader: no arbitrary objects
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise InputError(f"{label}: invalid YAML{where}: {problem[:200]}") from exc
    except ValueError as exc:  # a number past Python's digit limit
        raise InputError(f"{label}: invalid YAML: {brief(str(exc), 120)}") from exc


def _fail(label: str, key: str, message: str) -> InputError:
    shown = key if len(key) <= 120 else key[:117] + "..."  # keys hold the file's own names
    return InputError(f"{label}: {shown}: {message}")


def _strings(value: Any, label: str, key: str, *, allow_empty: bool = True) -> tuple[str, ...]:
    if value is None:
        value = []
    if not isinstance(value, list):
        raise _fail(label, key, f"must be a list of strings, not {type(value).__name__}")
    out: list[str] = []
    for i, item in enumerate(value):
        if not isinstance(item, str) or not item.strip():
            raise _fail(label, f"{key}[{i}]", f"must be a non-empty string, got {brief(item)}")
        if "\n" in item or "\r" in item:
            raise _fail(label, f"{key}[{i}]", "must be one line")
        out.append(item.strip())
    if not out and not allow_empty:
        raise _fail(label, key, "must not be empty")
    return tuple(out)


def _mapping(value: Any, label: str, key: str) -> dict[str, Any]:
    if not isinstance(value, dict) or not value:
        raise _fail(label, key, "must be a non-empty mapping")
    return value


def _build(data: Any, file: Path, label: str, sha256: str) -> AttributeSpec:
    if not isinstance(data, dict):
        raise InputError(f"{label}: a spec is a mapping with 'attributes' (and 'person')")
    unknown = set(data) - {"version", "person", "attributes"}
    if unknown:
        first = sorted(map(str, unknown))[0]
        raise _fail(label, first, "unknown key (expected version, person, attributes)")
    version = data.get("version", SPEC_VERSION)
    if version != SPEC_VERSION:
        raise _fail(label, "version", f"must be {SPEC_VERSION}, got {brief(version)}")
    person = data.get("person") or {}
    if not isinstance(person, dict):
        raise _fail(label, "person", "must be a mapping")
    extra = set(person) - {"terms", "prompts", "other_prompts"}
    if extra:
        raise _fail(label, f"person.{sorted(map(str, extra))[0]}", "unknown key")
    person_prompts = _strings(person.get("prompts"), label, "person.prompts")
    other_prompts = _strings(person.get("other_prompts"), label, "person.other_prompts")
    if bool(person_prompts) != bool(other_prompts):
        raise _fail(label, "person", "give both prompts and other_prompts, or neither")
    attributes = [
        _attribute(name, value, file, label)
        for name, value in _mapping(data.get("attributes"), label, "attributes").items()
    ]
    return AttributeSpec(
        source=label,
        person_terms=_strings(person.get("terms"), label, "person.terms"),
        person_prompts=person_prompts,
        other_prompts=other_prompts,
        attributes=tuple(attributes),
        sha256=sha256,
    )


def _attribute(name: Any, value: Any, file: Path, label: str) -> Attribute:
    key = f"attributes.{name}"
    if not isinstance(name, str) or not _ATTRIBUTE_NAME.match(name):
        raise _fail(label, key, "attribute names are lower-case identifiers (a-z, 0-9, _)")
    if name in RESERVED_COLUMNS or name.endswith(ATTRIBUTE_SUFFIXES):
        raise _fail(label, key, f"{brief(name)} would clash with a column of labels.parquet")
    if not isinstance(value, dict):
        raise _fail(label, key, "must be a mapping with 'groups'")
    extra = set(value) - {"description", "groups", "target", "swap"}
    if extra:
        raise _fail(label, f"{key}.{sorted(map(str, extra))[0]}", "unknown key")
    groups_raw = _mapping(value.get("groups"), label, f"{key}.groups")
    if len(groups_raw) < 2:
        raise _fail(label, f"{key}.groups", "an attribute needs at least two groups")
    groups: list[Group] = []
    owner: dict[str, str] = {}
    for group_name, group_value in groups_raw.items():
        gkey = f"{key}.groups.{group_name}"
        if not isinstance(group_name, str) or not _GROUP_NAME.match(group_name):
            raise _fail(label, gkey, "group names are letters, digits and _ . + -")
        if group_name in RESERVED_GROUPS:
            raise _fail(label, gkey, f"{brief(group_name)} is reserved")
        if not isinstance(group_value, dict):
            raise _fail(label, gkey, "must be a mapping with terms and/or prompts")
        extra = set(group_value) - {"terms", "prompts"}
        if extra:
            raise _fail(label, f"{gkey}.{sorted(map(str, extra))[0]}", "unknown key")
        terms = _strings(group_value.get("terms"), label, f"{gkey}.terms")
        prompts = _strings(group_value.get("prompts"), label, f"{gkey}.prompts")
        if not terms and not prompts:
            raise _fail(label, gkey, "needs terms (caption words) or prompts (image prompts)")
        for i, term in enumerate(terms):
            if not (_WORD_EDGE.match(term) and _WORD_EDGE.match(term[-1])):
                raise _fail(
                    label,
                    f"{gkey}.terms[{i}]",
                    f"{brief(term)} must start and end with a letter or digit",
                )
            norm = normalize_term(term)
            if norm in owner:
                where = "twice" if owner[norm] == group_name else f"also in {owner[norm]}"
                raise _fail(label, f"{gkey}.terms[{i}]", f"{brief(term)} is listed {where}")
            owner[norm] = group_name
        groups.append(Group(group_name, terms, prompts))
    names = [g.name for g in groups]
    target = _target(value.get("target"), names, label, f"{key}.target")
    swap = value.get("swap")
    swap_path: Path | None = None
    if swap is not None:
        if not isinstance(swap, str) or not swap.strip() or "\0" in swap:
            raise _fail(label, f"{key}.swap", "must be a file name")
        swap_path = (file.parent / swap).resolve()
        if not swap_path.is_file():
            raise _fail(label, f"{key}.swap", f"{brief(str(swap_path), 300)} does not exist")
    description = value.get("description") or name
    if not isinstance(description, str):
        raise _fail(label, f"{key}.description", "must be a string")
    return Attribute(name, description, tuple(groups), target, swap_path)


def _target(value: Any, names: list[str], label: str, key: str) -> tuple[float, ...]:
    if value is None:
        return tuple(1.0 / len(names) for _ in names)
    if not isinstance(value, dict) or set(value) != set(names):
        raise _fail(label, key, f"must give a share for each group: {', '.join(names)}")
    shares = []
    for name in names:
        share = value[name]
        if isinstance(share, bool) or not isinstance(share, int | float) or not share > 0:
            raise _fail(label, f"{key}.{name}", f"must be a positive number, got {brief(share)}")
        shares.append(float(share))
    if not math.isclose(sum(shares), 1.0, abs_tol=1e-6):
        raise _fail(label, key, f"shares sum to {sum(shares):g}, not 1")
    return tuple(shares)
