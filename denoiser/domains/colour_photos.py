"""Colour photographs (CBSD432 / CSet9): RGB patches, awgn drawn
independently in each channel (blind sigma in [0, 55]), an RGB-in RGB-out
``opponent_unet_wide`` grown from the grey photo model (the built-in one is a
``photo_unet_wide``; a ``photo_unet`` grows into it too), PSNR and SSIM on the RGB
image."""

from __future__ import annotations

from denoiser.domains.photos import looks_like_photo, photo_domain
from denoiser.imaging.images import COLOUR_CHROMA, LoadedImage, is_colour

__all__ = ["COLOUR_CHROMA", "COLOUR_PHOTOS", "recognise_colour"]


def recognise_colour(image: LoadedImage) -> bool:
    """A photograph whose chroma is not about 0 (a grey image saved as RGB is not colour)."""
    return looks_like_photo(image) and is_colour(image)


COLOUR_PHOTOS = photo_domain(
    name="colour",
    words="colour photographs",
    channels=3,
    architecture="opponent_unet_wide",
    train_hint="train one with `denoise train --dataset cbsd432`",
    recognises=recognise_colour,
    fallbacks=("photos",),
)
