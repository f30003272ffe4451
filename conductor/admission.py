"""Admission: whether a routed request may run, judged on predicted load against the SLOs.

| mode         | on arrival                                   | after prefill             |
|--------------|----------------------------------------------|---------------------------|
| `none`       | admit                                        | —                         |
| `per_stage`  | prefill load only                            | decode load (work is lost) |
| `early`      | max(prefill load, decode load now)           | —                         |
| `predictive` | max(prefill load, decode load projected to   | —                         |
|              | the moment this request's prefill finishes)  |                           |

Prefill load = predicted TTFT / TTFT SLO; decode load = max(predicted TBT / TBT SLO, KV
memory use). A load above its threshold (settings) rejects, with the numbers in the reason.
Once admitted under `early` or `predictive`, a request is never rejected later: a busy
decode node makes it wait for room instead.
"""
from __future__ import annotations

from conductor.decision import DecodeChoice, PrefillChoice, RejectReason, Rejection, Stage
from conductor.modes import AdmissionMode
from conductor.settings import SettingsValues


def picks_decode_after_prefill(mode: AdmissionMode) -> bool:
    """`per_stage` picks (and judges) the decode node only once the prefill is done."""
    return mode is AdmissionMode.PER_STAGE


def projects_decode_load(mode: AdmissionMode) -> bool:
    return mode is AdmissionMode.PREDICTIVE


def check_arrival(
    settings: SettingsValues, prefill: PrefillChoice, decode: DecodeChoice | None
) -> Rejection | None:
    mode = settings.admission
    if mode is AdmissionMode.NONE:
        return None
    rejection = _check_prefill(settings, prefill)
    if rejection is not None or mode is AdmissionMode.PER_STAGE or decode is None:
        return rejection
    reason = RejectReason.DECODE_OVERLOADED_PROJECTED if decode.projected else RejectReason.DECODE_OVERLOADED
    return _check_decode(settings, decode, reason, Stage.ARRIVAL)


def check_after_prefill(settings: SettingsValues, decode: DecodeChoice) -> Rejection | None:
    if settings.admission is not AdmissionMode.PER_STAGE:
        return None
    return _check_decode(settings, decode, RejectReason.DECODE_OVERLOADED, Stage.AFTER_PREFILL)


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
        retry_after_s=min(60.0, max(1.0, prefill.queue_s - (limit - prefill.service_s))),
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
