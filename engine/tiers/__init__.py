"""KV tiers under the device region: host DRAM, local disk, and a cluster store shared by
every node (Mooncake Store), with the manager that demotes, fetches and promotes blocks.

* `config.TierConfig`   -- sizes, disk path, store address, write policy (`kv_tiers` in the cluster config)
* `policy.WritePolicy`  -- write_through / write_through_selective / write_back, and why write_back is the default
* `record`              -- the checksummed block record every lower tier stores
* `host.HostPool`       -- the preallocated, registrable host pool
* `disk.DiskTier`       -- one checksummed file per block, LRU, survives restarts
* `backend`             -- the store interface (exists / get_into / put_from / remove) and an in-process fake
* `mooncake_store`      -- the Mooncake Store backend and the `mooncake_master` process
* `cluster.ClusterTier` -- best-effort store access under the model's namespace
* `manager.TierManager` -- the engine hooks: demote on eviction, plan and prefetch, promote at admission
"""
from engine.tiers.backend import FakeStore, StoreBackend
from engine.tiers.config import TierConfig
from engine.tiers.manager import TierManager
from engine.tiers.namespace import kv_namespace
from engine.tiers.policy import DEFAULT_POLICY, WritePolicy
from engine.tiers.stats import TierStats

__all__ = ["DEFAULT_POLICY", "FakeStore", "StoreBackend", "TierConfig", "TierManager", "TierStats", "WritePolicy",
           "kv_namespace"]
