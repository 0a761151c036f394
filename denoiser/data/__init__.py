"""The data a model learns from: downloads, the IDX and image-folder datasets,
their splits, the noise, the shard sets and training-time augmentation.

May import: ``denoiser.core``, ``denoiser.imaging``, ``denoiser.config`` (and itself).
"""
