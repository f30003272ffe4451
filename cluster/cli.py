"""The `halfmoon` command line."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
import uuid
from pathlib import Path

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


def _generate_remote(prompt: str, chat: bool, params, address: str, timing: bool,
                     api_key: str | None = None) -> None:
    import grpc

    from cluster.client import Client, make_request

    req = make_request(chat=[("user", prompt)], params=params) if chat else make_request(prompt, params=params)
    final = None
    with Client(address, api_key) as client:
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
    config_file: Path | None = typer.Option(None, "--config", help="A cluster config (YAML, see deploy/); "
                                            "the options below override it."),
    launcher: str = typer.Option("ray", "--launcher", help="ray: actors on an embedded local Ray cluster; "
                                 "processes: one OS process per server."),
    prefill: int | None = typer.Option(None, "--prefill", help="Prefill nodes (default 1)."),
    decode: int | None = typer.Option(None, "--decode", help="Decode nodes (default 1)."),
    host: str | None = typer.Option(None, "--host", help="Address every server binds (default 127.0.0.1)."),
    port: int | None = typer.Option(None, "--port", help="The conductor's gRPC port (default 50051)."),
    http_port: int | None = typer.Option(None, "--http-port", help="OpenAI-compatible HTTP port and /metrics (default 8000)."),
    num_blocks: int | None = typer.Option(None, "--num-blocks", help="KV blocks per node (default 512)."),
    dtype: str | None = typer.Option(None, "--dtype", help="Model dtype: float32, bfloat16, w8a8 or fp8 "
                                     "(default auto: float32 on CPU, bfloat16 on GPU)."),
    policy: str | None = typer.Option(None, "--policy", help="Routing policy (default cost_aware)."),
    admission: str | None = typer.Option(None, "--admission", help="Admission mode (default early)."),
    ttft_slo: float | None = typer.Option(None, "--ttft-slo", help="TTFT SLO in seconds (default 30)."),
    tbt_slo: float | None = typer.Option(None, "--tbt-slo", help="TBT SLO in seconds (default 1)."),
    cost_model: str | None = typer.Option(None, "--cost-model", help="A `halfmoon profile` file."),
    api_key: str | None = typer.Option(None, "--api-key", help="Clients must send this key (HTTP `Authorization: "
                                       "Bearer`, gRPC `authorization` metadata); default: $HALFMOON_API_KEY, else none."),
    kv_host_gb: float | None = typer.Option(None, "--kv-host-gb", help="Host DRAM KV tier per node, GiB "
                                            "(default 1; 0 turns every tier off)."),
    kv_disk_gb: float | None = typer.Option(None, "--kv-disk-gb", help="Disk KV tier per node, GiB (default 4; 0: off)."),
    kv_disk_dir: str | None = typer.Option(None, "--kv-disk-dir", help="Where the disk tier keeps its files "
                                           "(default $HALFMOON_CACHE/kv)."),
    kv_store: bool | None = typer.Option(None, "--kv-store/--no-kv-store", help="The cluster KV tier on Mooncake "
                                         "Store (default on; a master is started beside the conductor)."),
    kv_store_master: str | None = typer.Option(None, "--kv-store-master", help="host:port of a running "
                                               "mooncake_master instead of starting one."),
    kv_policy: str | None = typer.Option(None, "--kv-policy", help="write_back (default), write_through or "
                                         "write_through_selective."),
    timeout: float = typer.Option(300.0, "--timeout", help="Seconds to wait for every node to register."),
    demo_prompt: str | None = typer.Option(None, "--demo-prompt",
                                           help="Once up, answer this chat prompt through the cluster."),
) -> None:
    """Start a cluster on this machine (conductor + prefill and decode nodes) and serve until
    Ctrl-C / SIGTERM, which stops everything it started."""
    import signal
    import threading

    from cluster.launch import LAUNCHERS

    if launcher not in LAUNCHERS:
        typer.echo(f"error: --launcher must be one of {', '.join(LAUNCHERS)}, got {launcher!r}", err=True)
        raise typer.Exit(2)
    overrides = {"prefill.count": prefill, "decode.count": decode, "conductor.host": host, "prefill.host": host,
                 "decode.host": host, "conductor.grpc_port": port, "conductor.http_port": http_port,
                 "kv.num_blocks": num_blocks, "model.dtype": dtype, "conductor.policy": policy, "conductor.admission": admission,
                 "conductor.ttft_slo_s": ttft_slo, "conductor.tbt_slo_s": tbt_slo, "conductor.cost_model": cost_model,
                 "auth.api_key": api_key, "kv_tiers.host_gb": kv_host_gb, "kv_tiers.disk_gb": kv_disk_gb,
                 "kv_tiers.disk_dir": kv_disk_dir, "kv_tiers.store": kv_store, "kv_tiers.store_master": kv_store_master,
                 "kv_tiers.policy": kv_policy}
    if kv_host_gb == 0:  # no host tier: nothing can sit under it either, unless asked for explicitly
        overrides["kv_tiers.disk_gb"] = kv_disk_gb if kv_disk_gb is not None else 0.0
        overrides["kv_tiers.store"] = kv_store if kv_store is not None else False
    config = _config(config_file, {k: v for k, v in overrides.items() if v is not None})
    typer.echo(f"starting conductor + {config.prefill.count} prefill + {config.decode.count} decode node(s) "
               f"({launcher}) ...")
    try:
        cluster = LAUNCHERS[launcher](config, timeout)
    except Exception as e:  # noqa: BLE001 (every start-up failure ends here with its reason)
        typer.echo(f"error: the cluster did not start: {e}", err=True)
        raise typer.Exit(1)
    http = f" and {cluster.http_url}/v1 (HTTP)" if cluster.http_url else ""
    typer.echo(f"halfmoon serving on {cluster.grpc_address} (gRPC){http}; Ctrl-C stops it")
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    try:
        if demo_prompt:
            from engine.sampling import SamplingParams

            typer.echo(f"> {demo_prompt}")
            _generate_remote(demo_prompt, True, SamplingParams(max_tokens=64), cluster.grpc_address, True,
                             config.auth.api_key)
        while not done.wait(2.0):
            problem = cluster.problem()
            if problem:
                typer.echo(f"{problem}; stopping", err=True)
                break
    finally:
        cluster.stop()
        typer.echo("stopped")


def _config(path: Path | None, overrides: dict[str, object]):
    """The config file (or the default config) with command-line overrides; exits 2 naming
    the bad field."""
    from cluster.config import ClusterConfig, ConfigError, load_config, with_overrides

    try:
        config = load_config(path) if path is not None else ClusterConfig()
        return with_overrides(config, overrides, source="command line") if overrides else config
    except ConfigError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)


def _connect_ray(address: str, namespace: str) -> None:
    """Join the existing Ray cluster at `address` (`cluster.ray_connect`); exits 1 with the
    reason within seconds when it cannot."""
    from cluster.ray_connect import RayConnectError, connect

    try:
        connect(address, namespace)
    except RayConnectError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1)


@app.command()
def up(
    config_file: Path = typer.Option(..., "--config", help="The cluster config (YAML, see deploy/)."),
    address: str | None = typer.Option(None, "--address", help="The Ray cluster (GCS host:port, or auto); "
                                       "default: ray.address in the config, else auto (inside `ray job "
                                       "submit`: the job's cluster)."),
    timeout: float = typer.Option(600.0, "--timeout", help="Seconds to wait for every node to register."),
) -> None:
    """Deploy the cluster onto an existing Ray cluster as detached, named actors in the
    config's Ray namespace, and return once every node has registered. It keeps serving
    after this command (or the `ray job submit` job running it) ends: `halfmoon down` stops it."""
    from cluster.ray_launcher import DeployError, RayLauncher

    config = _config(config_file, {})
    _connect_ray(address or config.ray.address or "auto", config.ray.namespace)
    import ray

    try:
        dep = RayLauncher(config, detached=True).start(timeout)
    except DeployError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1)
    finally:
        ray.shutdown()
    typer.echo(f"halfmoon is up in Ray namespace {dep.namespace!r}: gRPC {dep.grpc_address}"
               + (f", HTTP {dep.http_url}/v1" if dep.http_url else ""))
    for n in dep.nodes:
        typer.echo(f"  {n.node_id} ({n.role}) on Ray node {n.placement.ray_node_id[:12]} at {n.host}, "
                   f"pid {n.placement.pid}")
    typer.echo(f"stop it with: halfmoon down --config {config_file}")


@app.command()
def down(
    config_file: Path | None = typer.Option(None, "--config", help="Take the Ray address and namespace from it."),
    address: str | None = typer.Option(None, "--address", help="The Ray cluster (GCS host:port, or auto)."),
    namespace: str | None = typer.Option(None, "--namespace", help="Ray namespace (default: the config's, else halfmoon)."),
    timeout: float = typer.Option(20.0, "--timeout", help="Seconds each server gets to stop before it is killed."),
) -> None:
    """Stop every halfmoon actor (nodes, then the conductor) in a Ray namespace."""
    from cluster.config import RayConfig
    from cluster.ray_launcher import stop_namespace

    ray_config = _config(config_file, {}).ray if config_file is not None else RayConfig()
    ns = namespace or ray_config.namespace
    _connect_ray(address or ray_config.address or "auto", ns)
    import ray

    try:
        stopped = stop_namespace(ns, timeout)
    finally:
        ray.shutdown()
    typer.echo(f"stopped {', '.join(stopped)}" if stopped else f"nothing of halfmoon runs in Ray namespace {ns!r}")


@app.command()
def status(address: str = typer.Option("127.0.0.1:50051", "--address"),
           as_json: bool = typer.Option(False, "--json", help="One JSON document (schema halfmoon.status/v1, "
                                        "see cluster/status.py) instead of tables.")) -> None:
    """Show the cluster's nodes and the admission settings in force."""
    import json

    import grpc

    from cluster.client import Client
    from cluster.status import from_proto, print_tables

    with Client(address) as client:
        try:
            st = from_proto(address, client.status())
        except grpc.RpcError as e:
            typer.echo(f"error: {e.code().name}: {e.details()}", err=True)
            raise typer.Exit(1)
    if as_json:
        typer.echo(json.dumps(st.to_json(), indent=2))
    else:
        print_tables(st)


admin_app = typer.Typer(help="Read and change scheduling settings at runtime.", no_args_is_help=True)
app.add_typer(admin_app, name="admin")


@admin_app.command("get")
def admin_get(address: str = typer.Option("127.0.0.1:50051", "--address")) -> None:
    """Print the settings in force."""
    import grpc
    from rich.console import Console
    from rich.table import Table

    from cluster.client import Client
    from proto.halfmoon.v1 import admin_pb2

    with Client(address) as client:
        try:
            res = client.admin.GetSettings(admin_pb2.GetSettingsRequest(), timeout=5)
        except grpc.RpcError as e:
            typer.echo(f"error: {e.code().name}: {e.details()}", err=True)
            raise typer.Exit(1)
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


@admin_app.command("move")
def admin_move(node_id: str = typer.Argument(..., help="the node, e.g. decode-1"),
               role: str = typer.Argument(..., help="prefill | decode"),
               timeout_s: float = typer.Option(120.0, "--timeout", help="seconds to drain and switch"),
               address: str = typer.Option("127.0.0.1:50051", "--address")) -> None:
    """Move a node to the other pool: drain it (its requests finish, no new ones), restart it
    in ROLE, and wait until it serves in it."""
    import grpc

    from cluster.client import Client
    from proto.halfmoon.v1 import admin_pb2

    with Client(address) as client:
        try:
            res = client.admin.MoveNode(admin_pb2.MoveNodeRequest(node_id=node_id, role=role, timeout_s=timeout_s,
                                                                  actor="cli"), timeout=timeout_s + 10)
        except grpc.RpcError as e:
            typer.echo(f"error: {e.code().name}: {e.details()}", err=True)
            raise typer.Exit(1)
    typer.echo(f"{res.node_id}: {res.from_role} -> {res.role} (drained in {res.drained_s:.1f}s, "
               f"switched in {res.switched_s:.1f}s)")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def quantize(ctx: typer.Context) -> None:
    """Calibrate and cache the w8a8 (SmoothQuant) model ahead of serving it (try `--help`)."""
    from engine.quant_calib import main as quantize_main

    raise typer.Exit(quantize_main(list(ctx.args)) or 0)


def _run_bench(name: str, args: list[str]) -> int:
    """Run the program `bench.NAME` (its `main(argv)`) in a process of its own: benchmarks use
    every package and none imports them, this CLI included (DESIGN.md §1)."""
    spec = importlib.util.find_spec("bench")  # finds the package without importing it
    where = Path(spec.submodule_search_locations[0]) if spec and spec.submodule_search_locations else None
    if where is None or not ((where / f"{name}.py").is_file() or (where / name / "__init__.py").is_file()):
        typer.echo(f"error: no benchmark named {name!r}", err=True)
        return 2
    code = f"import sys, importlib; sys.exit(importlib.import_module('bench.{name}').main(sys.argv[1:]) or 0)"
    return subprocess.call([sys.executable, "-c", code, *args])


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def profile(ctx: typer.Context) -> None:
    """Profile the engine on this machine and write a cost-model file (try `--help`)."""
    raise typer.Exit(_run_bench("profile", list(ctx.args)))


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def bench(ctx: typer.Context, name: str = typer.Argument(..., help="engine | transfer | sim | replay | ...")) -> None:
    """Run the benchmark `bench/NAME.py` (extra arguments go to it; try `--help`)."""
    if not name.isidentifier():
        typer.echo(f"error: no benchmark named {name!r}", err=True)
        raise typer.Exit(2)
    raise typer.Exit(_run_bench(name, list(ctx.args)))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
