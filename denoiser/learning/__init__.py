"""Learning and judging a model: training, its checkpoints, losses and
progress, evaluation and the quality gate.

May import: ``denoiser.core``, ``denoiser.imaging``, ``denoiser.nets``,
``denoiser.config``, ``denoiser.data``, ``denoiser.folder``, ``denoiser.runtimes``,
``denoiser.domains`` (and itself).
"""
