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
from curate.errors import CurateError, InputError, describe_os_error
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

_state = {"debug": False}
_LOG_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}


def _version(value: bool) -> None:
    if value:
        typer.echo(f"curate {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: Annotated[
        bool, typer.Option("--debug", help="Show full tracebacks and library logs on errors.")
    ] = False,
    log_level: Annotated[
        str | None,
        typer.Option(
            "--log-level",
            "-l",
            help="Show curate's log on stderr from this level: info (what each stage read, "
            "decided and wrote), debug, or warning. Every stage also logs to "
            "OUT/.curate/STAGE/logs/ whatever this says. Env: CURATE_LOG_LEVEL.",
            envvar="CURATE_LOG_LEVEL",
            show_default=False,
        ),
    ] = None,
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    _state["debug"] = debug or os.environ.get("CURATE_DEBUG", "") not in ("", "0")
    # Libraries (open_clip, huggingface_hub) log retries and errors on the root logger; the CLI
    # reports problems itself as one line, so their chatter is only shown with --debug.
    logging.basicConfig(level=logging.INFO if _state["debug"] else logging.CRITICAL, force=True)
    _show_curate_log(log_level)


def _show_curate_log(level_name: str | None) -> None:
    """The `curate` logger's records at `level_name` and above on stderr, through the console
    the progress bars use (so lines print above a running bar); none without a level."""
    from rich.logging import RichHandler

    logger = logging.getLogger("curate")
    for handler in [h for h in logger.handlers if getattr(h, "_curate_cli", False)]:
        logger.removeHandler(handler)
    logger.setLevel(logging.NOTSET)
    logger.propagate = True
    if level_name is None:
        return
    level = _LOG_LEVELS.get(level_name.lower())
    if level is None:
        raise InputError(f"--log-level must be one of {', '.join(_LOG_LEVELS)}, not {level_name!r}")
    handler = RichHandler(console=stderr_console, show_path=False, markup=False)
    handler.setLevel(level)
    handler._curate_cli = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False  # the root's handler (with --debug) would print them twice


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
