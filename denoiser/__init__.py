"""denoise-flow's library: data, noise, shards, models, metrics and image I/O.

Pure Python with no Prefect import, so every piece can be tested on tiny arrays
and reused outside the orchestrator. TensorFlow is imported lazily, inside the
functions that need it, so that light commands stay fast.
"""

__version__ = "0.1.0"
