"""The quality gate: whether an evaluated model denoises well enough to be
ranked against the production model.

A model passes when its PSNR gain over the noisy input reaches the minimum
asked for. For a photo set scored at several noise levels the gain is the
mean over them, and the gate says so, so that a reader of the card knows
what the figure is.
"""

from __future__ import annotations

from denoiser.core.cards import QualityGate


def judge_quality(metrics: dict, min_psnr_gain: float) -> QualityGate:
    """The verdict on ``metrics`` (an evaluation's result: :func:`denoiser.core.metrics.evaluate_arrays`
    or :func:`denoiser.core.metrics.evaluate_per_sigma`), from its overall PSNR gain."""
    overall = metrics["overall"]
    gate = QualityGate(
        min_psnr_gain=min_psnr_gain,
        psnr_gain=overall["psnr_gain"],
        passed=bool(overall["psnr_gain"] >= min_psnr_gain),
    )
    if "per_sigma" in metrics:
        sigmas = ", ".join(f"{s:g}" for s in overall["sigmas"])
        gate = gate.model_copy(update={"over": f"mean over sigmas {sigmas}"})
    return gate
