"""`curate models`: what --model and --pretrained accept."""

from __future__ import annotations

from typing import Annotated

import typer

from curate.cli.report import stdout_console
from curate.errors import InputError


def models_command(
    name: Annotated[
        str | None, typer.Argument(help="Show the pretrained tags of this model only.")
    ] = None,
) -> int:
    """List open_clip model names and their pretrained tags (the project's own models too)."""
    from curate.models.loading import _open_clip

    open_clip = _open_clip()
    tags: dict[str, list[str]] = {}
    for model, tag in open_clip.list_pretrained():
        tags.setdefault(model, []).append(tag)
    if name is not None and name not in open_clip.list_models():
        raise InputError(f"unknown model {name!r}; run `curate models` for the list")
    for model in open_clip.list_models():
        if name is None or model == name:
            stdout_console.print(
                f"[bold]{model}[/bold]: {', '.join(tags.get(model, [])) or '-'}", highlight=False
            )
    return 0
