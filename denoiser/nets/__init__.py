"""The networks: the architectures and the model factory (building, saving and
safely loading Keras models). Keras is imported inside the functions.

May import: ``denoiser.core`` (and itself).
"""
