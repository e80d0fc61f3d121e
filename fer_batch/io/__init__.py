"""Inputs: discover media in files and folders, decode and sample frames.

``discover`` turns paths into ``MediaSource`` objects (plus rows for inputs that are skipped or
failed); ``MediaReader`` streams the sampled frames of any source as BGR ``Frame`` objects.
"""

from fer_batch.io.discover import IMAGE_EXTS, VIDEO_EXTS, discover, media_kind, natural_key, source_id_for
from fer_batch.io.images import MAX_IMAGE_PIXELS, read_image, to_bgr
from fer_batch.io.sampling import sample_indices
from fer_batch.io.video import SEEKABLE_EXTS, MediaReader, can_seek

__all__ = [
    "IMAGE_EXTS",
    "MAX_IMAGE_PIXELS",
    "SEEKABLE_EXTS",
    "VIDEO_EXTS",
    "MediaReader",
    "can_seek",
    "discover",
    "media_kind",
    "natural_key",
    "read_image",
    "sample_indices",
    "source_id_for",
    "to_bgr",
]
