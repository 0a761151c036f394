"""Running a trained model: Keras and OpenVINO, which runtime a run uses,
and inference over arrays of any size in fixed-size batches.

May import: ``denoiser.core``, ``denoiser.imaging``, ``denoiser.nets``,
``denoiser.data``, ``denoiser.folder`` (and itself).
"""
