"""The leaves every part may use: the errors, fault points, atomic files and
store paths, signal holding, image metrics, the model card and recipe, and
the catalog of registered datasets (what the configs check names against),
what the CPU can compute, and the opponent colour planes.

May import: nothing of denoiser outside this package.
"""
