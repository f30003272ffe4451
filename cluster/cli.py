"""The `halfmoon` command line."""
from __future__ import annotations

import importlib
import sys
import uuid

import typer

app = typer.Typer(help="halfmoon: a disaggregated prefill/decode LLM serving cluster.",
                  no_args_is_help=True, add_completion=False)


@app.command()
def generate(
    prompt: str = typer.Argument(..., help="The prompt (a user message with --chat)."),
    local: bool = typer.Option(False, "--local", help="Run the engine in this process instead of asking a cluster."),
    chat: bool = typer.Option(False, "--chat", help="Wrap the prompt in the model's chat template."),
    max_tokens: int = typer.Option(64, "--max-tokens"),
    temperature: float = typer.Option(0.0, "--temperature"),
    top_p: float = typer.Option(1.0, "--top-p"),
    top_k: int = typer.Option(0, "--top-k"),
    seed: int | None = typer.Option(None, "--seed"),
    stop: list[str] = typer.Option([], "--stop", help="Stop string (repeatable)."),
    model: str = typer.Option("smollm2-135m-instruct", "--model", help="Model name or HF directory (with --local)."),
) -> None:
    """Generate text for PROMPT, streaming it as it is produced."""
    from engine.errors import InvalidRequestError
    from engine.sampling import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                            seed=seed, stop=tuple(stop))
    try:
        params.validate()
    except InvalidRequestError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)
    if not local:
        typer.echo("error: no cluster client yet; use --local", err=True)
        raise typer.Exit(2)
    _generate_local(prompt, chat, params, model)


def _generate_local(prompt: str, chat: bool, params, model: str) -> None:
    from engine.engine import LLMEngine
    from engine.errors import InvalidRequestError
    from engine.tokenizer import Message

    eng = LLMEngine(model, progress=True)
    rid = uuid.uuid4().hex
    try:
        if chat:
            eng.add_request(rid, params, messages=[Message("user", prompt)])
        else:
            eng.add_request(rid, params, prompt=prompt)
    except InvalidRequestError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)
    while eng.has_unfinished():
        for out in eng.step():
            sys.stdout.write(out.text_delta)
            sys.stdout.flush()
    sys.stdout.write("\n")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def bench(ctx: typer.Context, name: str = typer.Argument(..., help="engine | transfer | sim | replay | ...")) -> None:
    """Run the benchmark `bench/NAME.py` (extra arguments go to it; try `--help`)."""
    try:
        mod = importlib.import_module(f"bench.{name}")
    except ModuleNotFoundError as e:
        if e.name in (f"bench.{name}", "bench"):
            typer.echo(f"error: no benchmark named {name!r}", err=True)
            raise typer.Exit(2)
        raise
    raise typer.Exit(mod.main(list(ctx.args)) or 0)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
