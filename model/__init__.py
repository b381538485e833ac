"""ViT architecture: variants, position-embedding resampling, checkpoint loading, analytic FLOPs.

Pure PyTorch: no IO beyond reading a local weights file, nothing distributed.
"""

from model.flops import flops, param_count, train_flops_per_image
from model.pos_embed import resample_pos_embed
from model.variants import SIZES, ViTShape, parse_variant
from model.vit import VisionTransformer, ViTSpec, create_vit
from model.weights import (
    CheckpointMismatchError,
    LoadInfo,
    NpzArchitecture,
    check_npz_architecture,
    load_checkpoint,
    npz_architecture,
    npz_shapes,
)

__all__ = [
    "SIZES",
    "CheckpointMismatchError",
    "LoadInfo",
    "NpzArchitecture",
    "ViTShape",
    "ViTSpec",
    "VisionTransformer",
    "check_npz_architecture",
    "create_vit",
    "flops",
    "load_checkpoint",
    "npz_architecture",
    "npz_shapes",
    "param_count",
    "parse_variant",
    "resample_pos_embed",
    "train_flops_per_image",
]
