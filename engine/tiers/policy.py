"""When a device block is copied down to the tiers below (named as SGLang's HiCache names them).

* ``write_through``: every block, as soon as it is computed and cached on the device, is
  copied to the host pool (and put to the cluster store). Lower tiers always hold the
  device's blocks; an eviction costs nothing; every computed block costs a copy and a put.
* ``write_through_selective``: a block is copied down once it has been hit
  `TierConfig.selective_hits` times on the device: only reused prefixes pay for the copy.
* ``write_back``: a block is copied down when the device evicts it, just before its memory
  is reused. Blocks that stay on the device, or are never evicted before the node stops,
  are never copied.

The default is ``write_back``: a block only needs a lower tier once it leaves the device, so
copying at eviction moves each block at most once per eviction and nothing for the working
set that fits the device; the copy is a host memcpy (~0.1 ms for a 720 KB block) on the
allocation that evicts it, against the seconds its recompute would cost. Write-through pays
for every computed block, most of which (one-off suffixes, answers) are never read again.
Blocks that must reach other nodes before they are evicted (a finished turn's prompt and
answer) go to the store by the decode write-back (`TierConfig.write_back_on_finish`), not by
this policy.

Below the host pool the disk tier is always write-back (a host block is written to disk when
the host pool evicts it), and the cluster store gets a block whenever the host pool takes it
from the device.
"""
from __future__ import annotations

import enum


class WritePolicy(str, enum.Enum):
    WRITE_THROUGH = "write_through"
    WRITE_THROUGH_SELECTIVE = "write_through_selective"
    WRITE_BACK = "write_back"


DEFAULT_POLICY = WritePolicy.WRITE_BACK
