"""Grey photographs (Train400 / Set12, a user's folder of images): the luma of
each image, blind awgn, ``photo_unet``."""

from __future__ import annotations

from denoiser.domains.photos import looks_like_photo, photo_domain

GREY_PHOTOS = photo_domain(
    name="photos",
    words="photographs",
    channels=1,
    architecture="photo_unet",
    train_hint="train one with `denoise train --dataset train400` (or --dataset YOUR_FOLDER)",
    recognises=looks_like_photo,
    fallbacks=("colour",),
)
