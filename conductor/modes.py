"""The names an operator picks between: routing policies and admission modes.

Both are string enums so a config file, the admin CLI and a metrics label spell them the
same way. `parse_policy` / `parse_admission` also accept the short aliases the cluster
config uses (`cache_aware`, `load_balance`, `stage`, `off`).
"""
from __future__ import annotations

from enum import StrEnum


class PolicyName(StrEnum):
    """Prefill/decode routing policies, named as in Mooncake's scheduler comparison."""

    RANDOM = "random"
    ROUND_ROBIN = "round_robin"
    LEAST_LOADED = "least_loaded"  # load balancing: least queued work, caches ignored
    CACHE_AWARE_LOCAL = "cache_aware_local"  # min predicted TTFT using each node's own cache
    KV_CENTRIC = "kv_centric"  # cache_aware_local + pulling a longer prefix from a peer
    LONGEST_PREFIX = "longest_prefix"  # longest cached prefix, whatever the queues
    COST_AWARE = "cost_aware"  # kv_centric's TTFT + the work a choice costs the cluster, weighed by its backlog


class AdmissionMode(StrEnum):
    """When, and on which load, a request may be rejected."""

    NONE = "none"  # never reject
    PER_STAGE = "per_stage"  # prefill on arrival, decode after prefill (work can be wasted)
    EARLY = "early"  # on arrival, on max(prefill load, current decode load)
    PREDICTIVE = "predictive"  # on arrival, decode load projected to when prefill ends


_POLICY_ALIASES = {
    "cache_aware": PolicyName.CACHE_AWARE_LOCAL,
    "load_balance": PolicyName.LEAST_LOADED,
    "load_balancing": PolicyName.LEAST_LOADED,
}
_ADMISSION_ALIASES = {
    "off": AdmissionMode.NONE,
    "stage": AdmissionMode.PER_STAGE,
    "prediction": AdmissionMode.PREDICTIVE,
}


def parse_policy(text: str) -> PolicyName:
    """`PolicyName` for `text` (a name or alias); ValueError listing the choices otherwise."""
    key = text.strip().lower().replace("-", "_")
    if key in _POLICY_ALIASES:
        return _POLICY_ALIASES[key]
    try:
        return PolicyName(key)
    except ValueError:
        choices = ", ".join(p.value for p in PolicyName)
        raise ValueError(f"unknown policy {text!r}; choose one of {choices}") from None


def parse_admission(text: str) -> AdmissionMode:
    """`AdmissionMode` for `text` (a name or alias); ValueError listing the choices otherwise."""
    key = text.strip().lower().replace("-", "_")
    if key in _ADMISSION_ALIASES:
        return _ADMISSION_ALIASES[key]
    try:
        return AdmissionMode(key)
    except ValueError:
        choices = ", ".join(m.value for m in AdmissionMode)
        raise ValueError(f"unknown admission mode {text!r}; choose one of {choices}") from None
