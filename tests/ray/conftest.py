"""Ray clusters in these tests run on loopback only and without token auth; each test
cleans up what it started (Ray's own shutdown, or the PIDs of a `ray start` it ran)."""
from __future__ import annotations

import os

from cluster.launch import keep_ray_on_loopback

# Before any Ray cluster starts here: token auth is for clusters others can reach; these
# are private to the test. Workers inherit both settings from the processes we start.
os.environ["RAY_AUTH_MODE"] = "disabled"
keep_ray_on_loopback()
