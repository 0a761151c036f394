"""denoise-flow's library: data, noise, shards, models, metrics and image I/O.

Pure Python with no Prefect import, so every piece can be tested on tiny arrays
and reused outside the orchestrator. TensorFlow is imported lazily, inside the
functions that need it, so that light commands stay fast.

The parts, bottom up (each may import only the parts its docstring
names; ``tests/test_layout.py`` checks):

- ``core``: The leaves every part may use: the errors, fault points, atomic files and
  store paths, signal holding, image metrics, the model card and recipe, and the catalog
  of registered datasets (what the configs check names against), and what the CPU can
  compute.
- ``imaging``: One image at a time: decoding and encoding image files, cutting images
  into tiles and blending them back, small PNG renderings of batches.
- ``nets``: The networks: the architectures and the model factory (building, saving and
  safely loading Keras models). Keras is imported inside the functions.
- ``config``: The typed configs of the stages (a module).
- ``data``: The data a model learns from: downloads, the IDX and image-folder datasets,
  their splits, the noise, the shard sets and training-time augmentation.
- ``folder``: Folder work: a folder run (scan, journal, pipeline), the local or
  object-storage trees it reads and writes, the routing of each image to a model, and
  the run's report.
- ``runtimes``: Running a trained model: Keras and OpenVINO, which runtime a run uses,
  and inference over arrays of any size in fixed-size batches.
- ``domains``: The domains (digits, grey and colour photographs).
- ``learning``: Learning and judging a model: training, its checkpoints, losses and
  progress, evaluation and the quality gate.
- ``request``: The one resolved request of a training run (a module).
"""

__version__ = "0.1.0"
