"""One image at a time: decoding and encoding image files, cutting images into
tiles and blending them back, small PNG renderings of batches.

May import: ``denoiser.core`` (and itself).
"""
