"""SAM (segment-anything) in one place: ``build`` (variants, encoder, full Sam, tiny SAM), ``attention``
(decomposed relative positions, once), ``encoder`` (memory-bounded forward), ``memory`` (checks)."""

from dapseg.models.sam.build import (
    SAM_URL,
    SAM_VARIANTS,
    image_encoder_of,
    make_image_encoder,
    sam_decoder_file,
    sam_variant,
    sam_with_decoder,
    tiny_sam,
)
from dapseg.models.sam.encoder import SamEncoding, SamLastAttention, encode_image, preprocess
from dapseg.models.sam.memory import available_bytes, check_encode_memory, check_memory, estimate_sam_bytes

__all__ = [
    "SAM_URL",
    "SAM_VARIANTS",
    "SamEncoding",
    "SamLastAttention",
    "available_bytes",
    "check_encode_memory",
    "check_memory",
    "encode_image",
    "estimate_sam_bytes",
    "image_encoder_of",
    "make_image_encoder",
    "preprocess",
    "sam_decoder_file",
    "sam_variant",
    "sam_with_decoder",
    "tiny_sam",
]
