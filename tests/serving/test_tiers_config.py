"""The `kv_tiers` config section, what nodes and launchers make of it, the CLI overrides and
the tier metrics."""
from __future__ import annotations

from dataclasses import replace

import pytest
from prometheus_client import CollectorRegistry

from cluster.config import ClusterConfig, ConfigError, parse_config, with_overrides
from cluster.kv_tiers import embedded_store, node_tiers, role_tiers
from conductor.metrics import NodeMetrics
from engine.tiers.mooncake_store import master_problem, store_unavailable_reason


def test_tiers_are_on_by_default_and_sized_for_one_machine():
    t = ClusterConfig().kv_tiers
    assert (t.host_gb, t.disk_gb, t.store, t.store_master, t.policy, t.decode_write_back) == \
        (1.0, 4.0, True, None, "write_back", True)


@pytest.mark.parametrize("text, message", [
    ("kv_tiers: {host_gb: 0}", "kv_tiers.host_gb: must be > 0 when disk_gb > 0 or store is on"),
    ("kv_tiers: {host_gb: -1}", "kv_tiers.host_gb: Input should be greater than or equal to 0"),
    ("kv_tiers: {store_master: 'localhost'}", "kv_tiers.store_master: must be host:port, got 'localhost'"),
    ("kv_tiers: {policy: lru}", "kv_tiers.policy: Input should be 'write_back', 'write_through' or "
                                "'write_through_selective'"),
    ("kv_tiers: {selective_hits: 0}", "kv_tiers.selective_hits: Input should be greater than or equal to 1"),
    ("kv_tiers: {host: 1}", "kv_tiers.host: unknown key; allowed: host_gb, disk_gb"),
])
def test_bad_kv_tiers_values_name_the_field(text, message):
    with pytest.raises(ConfigError) as e:
        parse_config(text)
    assert message in str(e.value)


def test_node_tiers_per_role_and_node(tmp_path):
    cfg = with_overrides(ClusterConfig(), {"kv_tiers.store_master": "10.0.0.5:7000",
                                           "kv_tiers.disk_dir": str(tmp_path)})
    p = node_tiers(cfg, "prefill-0")
    d = node_tiers(cfg, "decode-0")
    assert p.disk_dir == str(tmp_path / "prefill-0") and d.disk_dir == str(tmp_path / "decode-0")  # never shared
    assert p.store and p.store_master == "10.0.0.5:7000" and p.store_metadata == "http://10.0.0.5:7001/metadata"
    assert (p.host_gib, p.disk_gib, p.policy) == (1.0, 4.0, "write_back")
    off = with_overrides(ClusterConfig(), {"kv_tiers.host_gb": 0, "kv_tiers.disk_gb": 0, "kv_tiers.store": False})
    assert node_tiers(off, "prefill-0") is None


def test_role_tiers_each_role_runs_what_it_uses(tmp_path):
    cfg = with_overrides(ClusterConfig(), {"kv_tiers.store_master": "10.0.0.5:7000",
                                           "kv_tiers.disk_dir": str(tmp_path)})
    t = node_tiers(cfg, "node-0")
    p, d, c = (role_tiers(t, r) for r in ("prefill", "decode", "colocated"))
    assert not p.write_back_on_finish and (p.disk_gib, p.copy_down) == (4.0, True)  # looks up, writes nothing back
    assert d.write_back_on_finish and d.store and (d.disk_gib, d.copy_down) == (0.0, False)  # stages puts only
    assert d.host_gib == t.host_gib and c == t  # colocated: both
    assert role_tiers(replace(t, write_back_on_finish=False), "decode") is None  # nothing left to run
    assert role_tiers(replace(t, store=False), "decode") is None
    assert role_tiers(None, "prefill") is None


def test_a_store_without_a_master_is_off_on_the_nodes(caplog):
    cfg = ClusterConfig()  # `halfmoon up` on a Ray cluster: no launcher-started master
    with caplog.at_level("WARNING"):
        t = node_tiers(cfg, "prefill-0")
    assert not t.store and t.host_gib == 1.0
    assert "no master is set or started (kv_tiers.store_master): the cluster KV tier is off" in caplog.text


def test_node_plans_carry_each_nodes_tiers():
    from cluster.specs import node_plans

    cfg = with_overrides(ClusterConfig(), {"kv_tiers.store_master": "127.0.0.1:7000", "prefill.count": 2})
    plans = {p.node_id: p.spec.kv_tiers for p in node_plans(cfg, "127.0.0.1:1")}
    assert set(plans) == {"prefill-0", "prefill-1", "decode-0"}
    assert [role_tiers(plans[n], n.split("-")[0]).write_back_on_finish for n in sorted(plans)] == [True, False, False]
    assert len({plans[n].disk_dir for n in plans}) == 3


@pytest.mark.skipif(store_unavailable_reason() is not None, reason=str(store_unavailable_reason()))
def test_the_process_launcher_starts_and_stops_a_master_beside_the_conductor(monkeypatch, tmp_path):
    """start_processes with the default kv_tiers: a master (and its keeper) answer on loopback
    before any node starts, every node is pointed at it, and stop() ends it."""
    from cluster import launch
    from cluster.local import LocalCluster

    started: list[LocalCluster] = []
    monkeypatch.setattr(LocalCluster, "start", lambda self, timeout_s=0: started.append(self) or self)
    monkeypatch.setattr(LocalCluster, "stop", lambda self, timeout_s=0: None)
    cfg = with_overrides(ClusterConfig(), {"kv_tiers.store_gb": 0.05, "conductor.grpc_port": 0,
                                           "conductor.http_port": 0, "kv_tiers.disk_dir": str(tmp_path)})
    running = launch.start_processes(cfg, 30)
    (cluster,) = started
    tiers = [n.kv_tiers for n in cluster.nodes]
    master, metadata = tiers[0].store_master, tiers[0].store_metadata
    assert all(t.store and t.store_master == master for t in tiers) and master.startswith("127.0.0.1:")
    assert master_problem(master, metadata) is None  # it answers
    running.stop()
    assert master_problem(master, metadata, timeout=0.5) is not None


def test_cli_overrides_reach_the_config(monkeypatch):
    from typer.testing import CliRunner

    from cluster import cli, launch

    seen: list[ClusterConfig] = []

    def fake_launcher(config, timeout):
        seen.append(config)
        raise RuntimeError("not starting in a test")
    monkeypatch.setitem(launch.LAUNCHERS, "processes", fake_launcher)
    out = CliRunner().invoke(cli.app, ["serve", "--launcher", "processes", "--kv-host-gb", "2", "--kv-disk-gb", "0",
                                       "--no-kv-store", "--kv-policy", "write_through"])
    assert out.exit_code == 1 and "not starting in a test" in out.output
    t = seen[0].kv_tiers
    assert (t.host_gb, t.disk_gb, t.store, t.policy) == (2.0, 0.0, False, "write_through")
    seen.clear()
    CliRunner().invoke(cli.app, ["serve", "--launcher", "processes", "--kv-host-gb", "0"])
    t = seen[0].kv_tiers
    assert (t.host_gb, t.disk_gb, t.store) == (0.0, 0.0, False)  # no host tier: nothing under it either
    out = CliRunner().invoke(cli.app, ["serve", "--launcher", "processes", "--kv-policy", "lru"])
    assert out.exit_code == 2 and "kv_tiers.policy" in out.output


def test_tier_metrics_follow_the_tiers_totals():
    from engine.tiers.stats import TierStats, TierUse

    registry = CollectorRegistry()
    m = NodeMetrics(registry, "prefill-0", "prefill")

    def stats(hits: int, failures: int, used: int, state: str = "up") -> TierStats:
        return TierStats({"device": 2 * hits, "host": hits, "disk": 0, "cluster": 0}, {"device->host": 10 * hits},
                         {}, {"host": TierUse(100, used, used)}, {"put_failures": failures,
                                                                    "store_evicted": 2 * failures}, state)

    m.observe_tiers(stats(16, 1, 5))
    m.observe_tiers(stats(48, 3, 7, "down"))
    m.observe_tier_load("disk", 0.002)
    v = lambda name, **kw: registry.get_sample_value(name, {"node": "prefill-0", "role": "prefill", **kw})  # noqa: E731
    assert v("halfmoon:kv_tier_hit_tokens_total", tier="host") == 48
    assert v("halfmoon:kv_tier_hit_tokens_total", tier="device") == 96
    assert v("halfmoon:kv_tier_moved_bytes_total", src="device", dst="host") == 480
    assert v("halfmoon:kv_store_put_failures_total") == 3
    assert v("halfmoon:kv_store_evicted_blocks_total") == 6
    assert v("halfmoon:kv_tier_blocks_used", tier="host") == 7
    assert v("halfmoon:kv_tier_blocks_capacity", tier="host") == 100
    assert v("halfmoon:kv_store_up") == 0
    assert v("halfmoon:kv_tier_load_seconds_count", tier="disk") == 1
    m.close()
    assert v("halfmoon:kv_tier_hit_tokens_total", tier="host") is None
