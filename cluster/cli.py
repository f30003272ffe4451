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
    address: str = typer.Option("127.0.0.1:50051", "--address", help="The conductor's gRPC address."),
    timing: bool = typer.Option(False, "--timing", help="Print where the time to first token went."),
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
    if local:
        _generate_local(prompt, chat, params, model)
    else:
        _generate_remote(prompt, chat, params, address, timing)


def _generate_remote(prompt: str, chat: bool, params, address: str, timing: bool) -> None:
    import grpc

    from cluster.client import Client, make_request

    req = make_request(chat=[("user", prompt)], params=params) if chat else make_request(prompt, params=params)
    final = None
    with Client(address) as client:
        try:
            for msg in client.stream(req):
                if msg.HasField("delta"):
                    sys.stdout.write(msg.delta.text)
                    sys.stdout.flush()
                else:
                    final = msg.final
        except grpc.RpcError as e:
            sys.stdout.write("\n")
            hint = " (is `halfmoon serve` running?)" if e.code() == grpc.StatusCode.UNAVAILABLE else ""
            typer.echo(f"error: {e.code().name}: {e.details()}{hint}", err=True)
            raise typer.Exit(1)
    sys.stdout.write("\n")
    if timing and final is not None:
        from rich.console import Console
        from rich.table import Table

        t = final.timing
        table = Table(title=f"request {final.request_id}: {final.finish_reason}, "
                            f"{final.usage.prompt_tokens} prompt ({final.usage.cached_tokens} cached) + "
                            f"{final.usage.completion_tokens} generated tokens")
        table.add_column("part")
        table.add_column("ms", justify="right")
        for name, v in (("queue (prefill node)", t.queue_s), ("prefill", t.prefill_s),
                        ("KV transfer (after prefill)", t.kv_transfer_s), ("first decode step", t.first_decode_s),
                        ("TTFT (at the conductor)", t.ttft_s)):
            table.add_row(name, f"{v * 1000:.1f}")
        table.caption = f"prefill {final.prefill_node} -> decode {final.decode_node}"
        Console(stderr=True).print(table)


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


@app.command()
def serve(
    prefill: int = typer.Option(1, "--prefill", help="Prefill nodes."),
    decode: int = typer.Option(1, "--decode", help="Decode nodes."),
    host: str = typer.Option("127.0.0.1", "--host"),
    port: int = typer.Option(50051, "--port", help="The conductor's gRPC port."),
    http_port: int = typer.Option(8000, "--http-port", help="OpenAI-compatible HTTP port (and /metrics)."),
    num_blocks: int = typer.Option(1024, "--num-blocks", help="KV blocks per node."),
    policy: str = typer.Option("kv_centric", "--policy"),
    admission: str = typer.Option("early", "--admission"),
    ttft_slo: float = typer.Option(30.0, "--ttft-slo", help="TTFT SLO in seconds."),
    tbt_slo: float = typer.Option(1.0, "--tbt-slo", help="TBT SLO in seconds."),
    cost_model: str | None = typer.Option(None, "--cost-model", help="A `halfmoon profile` file."),
    demo_prompt: str | None = typer.Option(None, "--demo-prompt",
                                           help="Once up, answer this chat prompt through the cluster."),
) -> None:
    """Start a local cluster (conductor + prefill and decode nodes, one process each) and
    serve until Ctrl-C / SIGTERM, which stops every process it started."""
    import signal
    import threading

    from cluster.local import LocalCluster
    from cluster.node_main import NodeSpec
    from conductor.server import ConductorSpec

    spec = ConductorSpec(host=host, grpc_port=port, http_port=http_port, cost_model=cost_model,
                         settings={"policy": policy, "admission": admission, "ttft_slo_s": ttft_slo,
                                   "tbt_slo_s": tbt_slo})
    node = NodeSpec(role="prefill", node_id="", conductor="", host=host, num_blocks=num_blocks)
    cluster = LocalCluster.build(prefill, decode, conductor=spec, node=node)
    typer.echo(f"starting conductor + {prefill} prefill + {decode} decode node(s) ...")
    cluster.start()
    typer.echo(f"halfmoon serving on {cluster.address} (gRPC) and http://{host}:{http_port}/v1 (HTTP); "
               "Ctrl-C stops it")
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    try:
        if demo_prompt:
            from engine.sampling import SamplingParams

            typer.echo(f"> {demo_prompt}")
            _generate_remote(demo_prompt, True, SamplingParams(max_tokens=64), cluster.address, True)
        while not done.wait(1.0):
            dead = [n for n, p in cluster.procs.items() if not p.is_alive()]
            if "conductor" in dead:
                typer.echo("conductor exited; stopping", err=True)
                break
    finally:
        cluster.stop()
        typer.echo("stopped")


@app.command()
def status(address: str = typer.Option("127.0.0.1:50051", "--address")) -> None:
    """Show the cluster's nodes and the admission settings in force."""
    import grpc
    from rich.console import Console
    from rich.table import Table

    from cluster.client import Client

    with Client(address) as client:
        try:
            st = client.status()
        except grpc.RpcError as e:
            typer.echo(f"error: {e.code().name}: {e.details()}", err=True)
            raise typer.Exit(1)
    con = Console()
    t = Table(title=f"halfmoon at {address} ({st.model})")
    for col in ("node", "role", "address", "state", "running", "waiting", "KV used", "cache hit"):
        t.add_column(col, justify="right" if col in ("running", "waiting", "KV used", "cache hit") else "left")
    for n in sorted(st.nodes, key=lambda n: (n.role != "prefill", n.node_id)):
        hit = f"{n.prefix_hits_tokens / n.prefix_queries_tokens:.1%}" if n.prefix_queries_tokens else "-"
        t.add_row(n.node_id, n.role, n.address, n.state, str(n.running), str(n.waiting),
                  f"{n.kv_blocks_used}/{n.kv_blocks_total}", hit)
    con.print(t)
    s = Table(title="admission settings")
    s.add_column("setting")
    s.add_column("value")
    for x in st.settings:
        s.add_row(x.name, x.value)
    con.print(s)


admin_app = typer.Typer(help="Read and change scheduling settings at runtime.", no_args_is_help=True)
app.add_typer(admin_app, name="admin")


@admin_app.command("get")
def admin_get(address: str = typer.Option("127.0.0.1:50051", "--address")) -> None:
    """Print the settings in force."""
    from rich.console import Console
    from rich.table import Table

    from cluster.client import Client
    from proto.halfmoon.v1 import admin_pb2

    with Client(address) as client:
        res = client.admin.GetSettings(admin_pb2.GetSettingsRequest(), timeout=5)
    t = Table()
    for c in ("setting", "value", "meaning"):
        t.add_column(c)
    for x in res.settings:
        t.add_row(x.name, x.value, x.description)
    Console().print(t)


@admin_app.command("set")
def admin_set(assignments: list[str] = typer.Argument(..., help="NAME=VALUE pairs, e.g. ttft_slo_s=5 policy=least_loaded"),
              address: str = typer.Option("127.0.0.1:50051", "--address")) -> None:
    """Change settings; all are validated first, and a bad value changes nothing."""
    import grpc

    from cluster.client import Client

    values = {}
    for a in assignments:
        name, sep, value = a.partition("=")
        if not sep or not name:
            typer.echo(f"error: {a!r} is not NAME=VALUE", err=True)
            raise typer.Exit(2)
        values[name.strip()] = value.strip()
    with Client(address) as client:
        try:
            res = client.set_settings(values)
        except grpc.RpcError as e:
            typer.echo(f"error: {e.code().name}: {e.details()}", err=True)
            raise typer.Exit(1)
    typer.echo("changed: " + (", ".join(res.changed) or "nothing (values already in force)"))


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
