"""Admission: whether a routed request may run, judged on predicted load against the SLOs.

| mode         | decode node chosen on | judged on arrival                    | judged after prefill      |
|--------------|-----------------------|--------------------------------------|---------------------------|
| `none`       | committed load        | —                                    | —                         |
| `per_stage`  | current load          | prefill load                         | decode load now (the      |
|              |                       |                                      | prefill's work is lost)   |
| `early`      | current load          | max(prefill load, decode load now)   | —                         |
| `predictive` | projected load        | max(prefill load, decode load at the | —                         |
|              |                       | moment this prefill will finish)     |                           |

Prefill load = predicted TTFT / TTFT SLO; decode load = max(predicted TBT / TBT SLO, KV
memory use); "current" counts the decode node's running and waiting requests, "committed"
also those assigned to it still in prefill, "projected" the residents still decoding at
the moment this request's KV would arrive (Mooncake's prediction-based early rejection).
A load above its threshold (settings) rejects, with the numbers in the reason. Under
`per_stage` each stage judges only its own load, on the node the request was paired with;
under `early` and `predictive` an admitted request is never rejected later: a full decode
node makes it wait for room instead.
"""
from __future__ import annotations

from conductor.decision import DecodeChoice, LoadBasis, PrefillChoice, RejectReason, Rejection, Stage
from conductor.modes import AdmissionMode
from conductor.settings import SettingsValues

_DECODE_BASIS = {
    AdmissionMode.NONE: LoadBasis.COMMITTED,
    AdmissionMode.PER_STAGE: LoadBasis.CURRENT,
    AdmissionMode.EARLY: LoadBasis.CURRENT,
    AdmissionMode.PREDICTIVE: LoadBasis.PROJECTED,
}


def decode_basis(mode: AdmissionMode) -> LoadBasis:
    """The decode load a mode looks at: it chooses the decode node on that load too."""
    return _DECODE_BASIS[mode]


def check_arrival(
    settings: SettingsValues, prefill: PrefillChoice, decode: DecodeChoice
) -> Rejection | None:
    mode = settings.admission
    if mode is AdmissionMode.NONE:
        return None
    rejection = _check_prefill(settings, prefill)
    if rejection is not None or mode is AdmissionMode.PER_STAGE:
        return rejection
    reason = RejectReason.DECODE_OVERLOADED_PROJECTED if decode.projected else RejectReason.DECODE_OVERLOADED
    return _check_decode(settings, decode, reason, Stage.ARRIVAL)


def judges_after_prefill(mode: AdmissionMode) -> bool:
    return mode is AdmissionMode.PER_STAGE


def check_after_prefill(settings: SettingsValues, decode_now: DecodeChoice) -> Rejection | None:
    """`per_stage`'s second verdict, on the paired decode node's current load."""
    if not judges_after_prefill(settings.admission):
        return None
    return _check_decode(settings, decode_now, RejectReason.DECODE_OVERLOADED, Stage.AFTER_PREFILL)


def _check_prefill(settings: SettingsValues, prefill: PrefillChoice) -> Rejection | None:
    limit = settings.prefill_reject_threshold * settings.ttft_slo_s
    ttft = prefill.ttft_s
    if ttft <= limit:
        return None
    return Rejection(
        reason=RejectReason.PREFILL_OVERLOADED,
        stage=Stage.ARRIVAL,
        detail=(
            f"predicted TTFT {ttft:.3g} s on {prefill.node} (queue {prefill.queue_s:.3g} s) exceeds "
            f"{settings.prefill_reject_threshold:g} x TTFT SLO {settings.ttft_slo_s:g} s"
        ),
        retry_after_s=min(60.0, max(1.0, ttft - limit)),
    )


def _check_decode(
    settings: SettingsValues, decode: DecodeChoice, reason: RejectReason, stage: Stage
) -> Rejection | None:
    load = decode.load(settings.tbt_slo_s)
    if load <= settings.decode_reject_threshold:
        return None
    when = f" at t={decode.at_s:.3f} s" if decode.projected else ""
    return Rejection(
        reason=reason,
        stage=stage,
        detail=(
            f"decode load {load:.3g} on {decode.node}{when} exceeds {settings.decode_reject_threshold:g} "
            f"(predicted TBT {decode.predicted_tbt_s * 1000:.3g} ms vs SLO {settings.tbt_slo_s * 1000:g} ms, "
            f"KV use {decode.kv_use:.0%})"
        ),
        retry_after_s=min(60.0, max(1.0, settings.typical_output_tokens * decode.predicted_tbt_s)),
    )
