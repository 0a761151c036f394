"""Colour photographs (CBSD432 / CSet9): RGB patches, awgn drawn
independently in each channel (blind sigma in [0, 55]), an RGB-in RGB-out
``colour_unet``, PSNR and SSIM on the RGB image."""

from __future__ import annotations

from denoiser.domains.base import Domain
from denoiser.domains.photos import looks_like_photo, photo_parts
from denoiser.images import LoadedImage, chroma_share

COLOUR_CHROMA = 0.01  # mean |Cb|, |Cr| above this (about 2.5 levels of 8 bits): not a grey image


def recognise_colour(image: LoadedImage) -> bool:
    """A photograph whose chroma is not about 0 (a grey image saved as RGB is not colour)."""
    return looks_like_photo(image) and chroma_share(image) > COLOUR_CHROMA


COLOUR_PHOTOS = Domain(
    name="colour",
    words="colour photographs",
    channels=3,
    shard_kind="patches",
    default_architecture="colour_unet",
    train_hint="train one with `denoise train --dataset cbsd432`",
    recognises=recognise_colour,
    # the folder pipeline denoises the luma plane: colour images go through the grey model
    folder_domain="photos",
    **photo_parts(3, "colour photographs", "colour"),
)
