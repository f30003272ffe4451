"""Admission: whether a routed request may run, judged on predicted load against the SLOs.

| mode         | decode node chosen on | judged on arrival                    | judged after prefill      |
|--------------|-----------------------|--------------------------------------|---------------------------|
| `none`       | committed load        | —                                    | —                         |
| `per_stage`  | current load          | prefill load                         | decode load now (the      |
|              |                       |                                      | prefill's work is lost)   |
| `early`      | committed load        | max(prefill load, committed decode   | —                         |
|              |                       | load over the request's life)        |                           |
| `predictive` | projected load        | max(prefill load, decode load from   | —                         |
|              |                       | the moment this prefill will finish, |                           |
|              |                       | over the request's life)             |                           |

`early` chooses the decode node as `none` does (the requests still in prefill count where
they are headed), so it differs from `none` only by what it rejects; `per_stage` keeps
Mooncake's stage-by-stage view (each stage looks at its own load now).

Prefill load = predicted TTFT / TTFT SLO; decode load = predicted TBT / TBT SLO; "current"
counts the decode node's running and waiting requests, "committed" also those assigned to
it still in prefill and the growth of every context over the request's life
(`conductor.policies.decode_estimate`), "projected" the residents still decoding at the
moment this request's KV would arrive (Mooncake's prediction-based early rejection), grown
the same way. KV memory is not judged on a prediction: the decode node reserves the
request's KV on dispatch and refuses when it has no room (`decode_out_of_blocks`), which
no prediction can do better than; the policies still rank decode nodes by KV use too.
A load above its threshold (settings) rejects, with the numbers in the reason. Under
`per_stage` each stage judges only its own load, on the node the request was paired with;
under `early` and `predictive` an admitted request is never rejected later: a full decode
node makes it wait for room instead.
"""
from __future__ import annotations

from conductor.decision import DecodeChoice, LoadBasis, PrefillChoice, RejectReason, Rejection, Stage
from conductor.modes import AdmissionMode
from conductor.settings import SettingsValues

_CHOICE_BASIS = {
    AdmissionMode.NONE: LoadBasis.COMMITTED,
    AdmissionMode.PER_STAGE: LoadBasis.CURRENT,
    AdmissionMode.EARLY: LoadBasis.COMMITTED,
    AdmissionMode.PREDICTIVE: LoadBasis.PROJECTED,
}


def decode_basis(mode: AdmissionMode) -> LoadBasis:
    """The decode load a mode chooses the decode node on, and judges it on."""
    return _CHOICE_BASIS[mode]


def check_arrival(
    settings: SettingsValues, prefill: PrefillChoice, decode: DecodeChoice, *,
    ttft_factor: float = 1.0, tbt_factor: float = 1.0,
) -> Rejection | None:
    """The arrival verdict; the factors calibrate the predictions (measured / predicted, as
    `conductor.predictions.Calibration` learns them) before they are judged."""
    mode = settings.admission
    if mode is AdmissionMode.NONE:
        return None
    rejection = _check_prefill(settings, prefill, ttft_factor)
    if rejection is not None or mode is AdmissionMode.PER_STAGE:
        return rejection
    reason = RejectReason.DECODE_OVERLOADED_PROJECTED if decode.projected else RejectReason.DECODE_OVERLOADED
    return _check_decode(settings, decode, reason, Stage.ARRIVAL, tbt_factor)


def judges_after_prefill(mode: AdmissionMode) -> bool:
    return mode is AdmissionMode.PER_STAGE


def check_after_prefill(settings: SettingsValues, decode_now: DecodeChoice, *,
                        tbt_factor: float = 1.0) -> Rejection | None:
    """`per_stage`'s second verdict, on the paired decode node's current load."""
    if not judges_after_prefill(settings.admission):
        return None
    return _check_decode(settings, decode_now, RejectReason.DECODE_OVERLOADED, Stage.AFTER_PREFILL, tbt_factor)


# A request is rejected on its TTFT only when it would wait behind more than this share of
# the TTFT limit: then it misses because of the queue, and its work would delay everyone
# behind it. A request late by its own size, or by a little on a short queue, is admitted:
# a late answer beats a refusal when the cluster has room, and its prefix stays cached for
# the turns that follow it.
CONGESTED_QUEUE_FRACTION = 0.5


def _check_prefill(settings: SettingsValues, prefill: PrefillChoice, factor: float = 1.0) -> Rejection | None:
    """Reject when the (calibrated) predicted TTFT passes its limit on a congested node."""
    limit = settings.prefill_reject_threshold * settings.ttft_slo_s
    ttft = prefill.ttft_s * factor
    if ttft <= limit:
        return None
    queue = prefill.queue_s * factor
    if queue <= CONGESTED_QUEUE_FRACTION * limit:
        return None
    calibrated = f" (calibrated x{factor:.2f})" if abs(factor - 1.0) >= 0.005 else ""
    return Rejection(
        reason=RejectReason.PREFILL_OVERLOADED,
        stage=Stage.ARRIVAL,
        detail=(
            f"predicted TTFT {ttft:.3g} s{calibrated} on {prefill.node} (queue {queue:.3g} s) exceeds "
            f"{settings.prefill_reject_threshold:g} x TTFT SLO {settings.ttft_slo_s:g} s"
        ),
        retry_after_s=min(60.0, max(1.0, ttft - limit)),
    )


def _check_decode(
    settings: SettingsValues, decode: DecodeChoice, reason: RejectReason, stage: Stage, factor: float = 1.0
) -> Rejection | None:
    load = decode.predicted_tbt_s * factor / settings.tbt_slo_s
    if load <= settings.decode_reject_threshold:
        return None
    when = f" at t={decode.at_s:.3f} s" if decode.projected else ""
    return Rejection(
        reason=reason,
        stage=stage,
        detail=(
            f"decode load {load:.3g} on {decode.node}{when} exceeds {settings.decode_reject_threshold:g} "
            f"(predicted TBT {decode.predicted_tbt_s * factor * 1000:.3g} ms vs SLO {settings.tbt_slo_s * 1000:g} ms, "
            f"KV use {decode.kv_use:.0%})"
        ),
        retry_after_s=min(60.0, max(1.0, settings.typical_output_tokens * decode.predicted_tbt_s)),
    )
