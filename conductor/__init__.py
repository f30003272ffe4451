"""The conductor: global scheduler and front door of a halfmoon cluster.

Scheduling core (pure, no I/O; the live conductor and `bench.sim` drive the same objects):
`request` (RequestInfo, ids) -> `view` (ClusterView and node records) -> `policies`
(where a request goes) -> `admission` (whether it may) -> `scheduler` (both, per the
runtime `settings`) -> `decision` (the answer). `cluster_state` is the one writer of the
view (request transitions, heartbeats, nodes up and down), `cost_model` predicts latencies,
`prefix_index` tracks every node's KV cache from the KV events its block pool emits
(`engine.block_pool.KVEvent`), `predictions` logs predicted vs measured and calibrates
admission, `role_planner` moves nodes between the prefill and decode pools.
"""
