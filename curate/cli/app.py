"""The `curate` command: one Typer app, one module per command group, errors as one line."""

from __future__ import annotations

import logging
import os
import sys
import traceback
from typing import Annotated

import click
import typer

from curate import __version__
from curate.errors import CurateError, describe_os_error
from curate.runtime.progress import stderr_console

app = typer.Typer(
    name="curate",
    help=(
        "Curate and debias image-text pretraining sets for CLIP-style models.\n\n"
        "Start with [bold]curate demo[/bold] (offline, a few minutes on a laptop), then point "
        "[bold]curate score[/bold] at your own img2dataset shards."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _exception_classes(name: str) -> tuple[type[BaseException], ...]:
    """Click's exception `name`, plus typer's vendored copy (typer ≥ 0.24 bundles its own click)."""
    found: list[type[BaseException]] = [getattr(click.exceptions, name)]
    try:
        from typer._click import exceptions as vendored  # private, hence guarded

        found.append(getattr(vendored, name))
    except (ImportError, AttributeError):
        pass
    return tuple(dict.fromkeys(found))


_USAGE_ERRORS = _exception_classes("UsageError")
_ABORTS = (*_exception_classes("Abort"), typer.Abort, KeyboardInterrupt)

_state = {"debug": os.environ.get("CURATE_DEBUG", "") not in ("", "0")}


def _version(value: bool) -> None:
    if value:
        typer.echo(f"curate {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: Annotated[
        bool, typer.Option("--debug", help="Show full tracebacks and library logs on errors.")
    ] = False,
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    _state["debug"] = _state["debug"] or debug
    # Libraries (open_clip, huggingface_hub) log retries and errors on the root logger; the CLI
    # reports problems itself as one line, so their chatter is only shown with --debug.
    logging.basicConfig(level=logging.INFO if _state["debug"] else logging.CRITICAL, force=True)


def _register() -> None:
    from curate.cli import (
        balance,
        demo,
        embed,
        fairness,
        metadata,
        models,
        rewrite,
        runtime,
        score,
        select,
        write,
    )

    app.command("embed")(embed.embed_command)
    app.command("score")(score.score_command)
    app.command("select")(select.select_command)
    app.command("write")(write.write_command)
    app.command("balance")(balance.balance_command)
    app.add_typer(metadata.metadata_app, name="metadata")
    app.command("rewrite")(rewrite.rewrite_command)
    app.command("audit")(fairness.audit_command)
    app.command("rebalance")(fairness.rebalance_command)
    app.command("demo")(demo.demo_command)
    app.command("models")(models.models_command)
    app.command("status")(runtime.status_command)
    app.command(
        "slurm",
        context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
        options_metavar="[OPTIONS] -- COMMAND [ARGS]...",
    )(runtime.slurm_command)


_register()


def _fail(message: str, code: int) -> None:
    stderr_console.print(
        f"[bold red]curate: error:[/bold red] {message}", highlight=False, soft_wrap=True
    )
    sys.exit(code)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: run the app, turning expected failures into one clear line."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    args = sys.argv[1:] if argv is None else argv
    try:
        result = app(args=args, prog_name="curate", standalone_mode=False)
    except _USAGE_ERRORS as exc:
        ctx = getattr(exc, "ctx", None)
        where = f"{ctx.command_path} --help" if ctx else "curate --help"
        _fail(f"{exc.format_message()} (see {where})", 2)  # type: ignore[attr-defined]
    except _ABORTS:
        _fail("interrupted; completed shards are kept, rerun to resume", 130)
    except CurateError as exc:
        if _state["debug"]:
            traceback.print_exc()
        _fail(" ".join(str(exc).split()), 2)
    except OSError as exc:  # disk full, a file where a folder goes, permission denied, ...
        if _state["debug"]:
            traceback.print_exc()
        _fail(" ".join(describe_os_error(exc).split()), 2)
    except Exception as exc:
        if _state["debug"]:
            raise
        detail = " ".join(str(exc).split())[:300]
        _fail(f"internal error {type(exc).__name__}: {detail} (rerun with --debug for details)", 1)
    sys.exit(result if isinstance(result, int) else 0)
