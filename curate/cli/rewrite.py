"""`curate rewrite`: LaCLIP-style caption rewrites through an OpenAI-compatible server."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from curate.cli import options as opt
from curate.cli.report import print_json, rewrite_summary, stdout_console, warn_shard_problems
from curate.errors import InputError


class BackendChoice(str, Enum):
    openai = "openai"
    rules = "rules"
    vllm = "vllm"


class ApiChoice(str, Enum):
    chat = "chat"
    completions = "completions"


RewriteWorkersOpt = Annotated[
    int,
    typer.Option(
        "--workers",
        min=1,
        help="Units rewritten at once on this machine (processes). Each sends up to "
        "--concurrency requests, so N workers keep up to N × --concurrency in flight; raise "
        "--concurrency first. --backend vllm: 1 (one model per GPU; spread over GPUs with "
        "--executor ray).",
        rich_help_panel="Cluster",
    ),
]


def rewrite_command(
    sources: opt.CaptionSources,
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            "-o",
            help="Output folder: rewrites/<unit>.parquet, cache/<unit>.sqlite (finished "
            "requests, for resuming), rewrite.json, .curate/rewrite/ (unit records and logs). "
            "Rerunning into it resumes.",
            rich_help_panel="Output",
        ),
    ] = Path("curate-rewrites"),
    backend: Annotated[
        BackendChoice,
        typer.Option(
            help="openai: any OpenAI-compatible server (vLLM, SGLang, llama.cpp, Ollama). "
            "vllm: the model in this process on a GPU (pip install 'curate[vllm]'). "
            "rules: offline word-level paraphrase from a small synonym table — a weak fallback "
            "for demos and tests, not a language model.",
            rich_help_panel="Backend",
        ),
    ] = BackendChoice.openai,
    base_url: Annotated[
        str | None,
        typer.Option(
            "--base-url",
            help="Server URL up to /v1, e.g. http://gpu-node:8000/v1 (vllm serve MODEL).",
            rich_help_panel="Backend",
        ),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option("--model", help="Model name the server serves.", rich_help_panel="Backend"),
    ] = None,
    api: Annotated[
        ApiChoice,
        typer.Option(
            help="chat: /v1/chat/completions with the examples as turns (chat models). "
            "completions: /v1/completions with 'source => target' lines (base models).",
            rich_help_panel="Backend",
        ),
    ] = ApiChoice.chat,
    api_key_env: Annotated[
        str,
        typer.Option(
            "--api-key-env",
            help="Environment variable holding the API key (sent as a Bearer token; never "
            "printed, written or passed to workers): it is read where the requests are sent, so "
            "set it wherever workers run (Ray nodes, array tasks).",
            rich_help_panel="Backend",
        ),
    ] = "OPENAI_API_KEY",
    num_rewrites: Annotated[
        int,
        typer.Option(
            "--num-rewrites", min=1, help="Rewrites per caption.", rich_help_panel="Rewrites"
        ),
    ] = 4,
    prompts: Annotated[
        Path | None,
        typer.Option(
            "--prompts",
            help="Prompt file (JSON: instruction, k, banks of [source, target] pairs per style) "
            "replacing the built-in one; its hash is recorded with every output.",
            rich_help_panel="Rewrites",
        ),
    ] = None,
    temperature: Annotated[
        float, typer.Option(help="Sampling temperature (>= 0).", rich_help_panel="Rewrites")
    ] = 0.9,
    top_p: Annotated[
        float, typer.Option(help="Nucleus sampling, in (0, 1].", rich_help_panel="Rewrites")
    ] = 0.95,
    max_tokens: Annotated[
        int,
        typer.Option(
            "--max-tokens",
            min=1,
            help="LLM tokens to generate; rewrites longer than CLIP's 77 tokens are rejected.",
            rich_help_panel="Rewrites",
        ),
    ] = 77,
    seed: Annotated[
        int,
        typer.Option(
            help="Seed of the example choice per caption and of the per-request seed.",
            rich_help_panel="Rewrites",
        ),
    ] = 0,
    caption_column: opt.CaptionColumnOpt = None,
    concurrency: Annotated[
        int,
        typer.Option(min=1, help="Requests in flight at once.", rich_help_panel="Robustness"),
    ] = 64,
    timeout: Annotated[
        float, typer.Option(help="Seconds per request (> 0).", rich_help_panel="Robustness")
    ] = 60.0,
    max_retries: Annotated[
        int,
        typer.Option(
            "--max-retries",
            min=0,
            help="Retries of a request on 429, 5xx, timeouts and connection errors "
            "(exponential backoff with jitter; at least the server's Retry-After, at most "
            "60 s).",
            rich_help_panel="Robustness",
        ),
    ] = 6,
    max_invalid: Annotated[
        int,
        typer.Option(
            "--max-invalid",
            min=0,
            help="New tries after an invalid output (empty, identical, multi-line, too long, "
            "refusal, boilerplate) before the rewrite is recorded as failed.",
            rich_help_panel="Robustness",
        ),
    ] = 3,
    max_error_rate: Annotated[
        float,
        typer.Option(
            "--max-error-rate",
            help="Stop when more than this share (0 to 1) of the last 200 requests failed.",
            rich_help_panel="Robustness",
        ),
    ] = 0.5,
    executor: opt.ExecutorOpt = opt.ExecutorChoice.local,
    ray_address: opt.RayAddressOpt = None,
    num_tasks: opt.NumTasksOpt = None,
    task_index: opt.TaskIndexOpt = None,
    workers: RewriteWorkersOpt = 1,
    no_progress: opt.NoProgressOpt = False,
    as_json: opt.JsonOpt = False,
) -> None:
    """Rewrite captions with a language model, LaCLIP style: an instruction, k example pairs
    drawn per caption (seeded) from example banks in several styles, then the caption. Every
    sample ends with its rewrites or a recorded reason. Results are cached per request, so a
    rerun (after a crash, kill or server outage) sends only what is missing.

    Units (shards, tables) are independent: run them on processes (--workers), Ray
    (--executor ray) or as array tasks (--executor array --num-tasks K). A uid repeated in a
    later unit is marked duplicate_uid once every unit is done (by whichever call finds them
    all done); its requests are sent all the same.
    """
    from curate.api import Runtime
    from curate.api import rewrite as run_rewrite
    from curate.rewriting.backends import (
        OpenAIBackend,
        RulesBackend,
        SamplingParams,
        VLLMBackend,
    )
    from curate.rewriting.checks import require_range
    from curate.rewriting.engine import EngineOptions
    from curate.rewriting.prompts import load_prompts
    from curate.rewriting.stage import RewriteConfig, RewriteOptions

    # Every setting is checked (by the library) before prompts are read or a model loads.
    require_range("--timeout", timeout, low=0, low_open=True)  # also with backends not using it
    params = SamplingParams(temperature=temperature, top_p=top_p, max_tokens=max_tokens)
    options = RewriteOptions(
        num_rewrites=num_rewrites,
        params=params,
        engine=EngineOptions(
            concurrency=concurrency,
            max_retries=max_retries,
            max_invalid=max_invalid,
            max_error_rate=max_error_rate,
            seed=seed,
        ),
        seed=seed,
    )
    if backend is BackendChoice.vllm and workers > 1 and executor is not opt.ExecutorChoice.ray:
        raise InputError(
            "--backend vllm loads the model in every worker: use --workers 1, or --executor ray "
            "(one GPU per unit)"
        )
    runtime = Runtime(
        executor.value,
        workers=workers,
        ray_address=ray_address,
        num_tasks=num_tasks,
        task_index=task_index,
    )
    template = load_prompts(prompts)
    if backend is BackendChoice.vllm:
        if not model:
            raise InputError("--backend vllm needs --model (a Hugging Face name or local path)")
        chosen = VLLMBackend(model, template, api=api.value, params=params, seed=seed)
        where = f"vLLM ({model})"
    elif backend is BackendChoice.openai:
        if not base_url or not model:
            raise InputError(
                "--backend openai needs --base-url and --model (or use --backend rules offline)"
            )
        chosen = OpenAIBackend(
            base_url,
            model,
            template,
            api=api.value,
            params=params,
            api_key_env=api_key_env,
            timeout=timeout,
            concurrency=concurrency,
            seed=seed,
        )
        where = base_url
    else:
        chosen = RulesBackend(seed=seed)
        where = "the rules backend"
    config = RewriteConfig(
        backend=chosen,
        template=template,
        options=options,
        caption_column=caption_column,
        where=where,
    )
    report = run_rewrite(sources, out, config, runtime=runtime, progress=not no_progress)
    warn_shard_problems(report.shard_errors, {})
    if as_json:
        print_json(report.to_json())
    else:
        rewrite_summary(report)
        if not report.complete:
            stdout_console.print(
                f"[yellow]{report.pending_units} units are not done yet[/yellow] (other array "
                "tasks): the counts above are this task's; duplicate uids across units are "
                "marked and rewrite.json written by the call that finds every unit done (any "
                f"rerun then, which skips the done units); `curate status {escape(str(out))}` "
                "shows what is left",
                highlight=False,
                soft_wrap=True,
            )
    if report.shard_errors:
        raise typer.Exit(1)
