"""The metrics every halfmoon process exports: defined in `conductor.metrics` (a leaf module,
so the conductor imports nothing of `cluster`), re-exported here for the launchers, the node
processes and their tests."""
from conductor.metrics import *  # noqa: F401,F403
