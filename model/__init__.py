"""ViT architecture: variants, position-embedding resampling, checkpoint loading, analytic FLOPs.

Pure PyTorch: no IO beyond reading a local weights file, nothing distributed.
"""

from model.flops import flops, param_count, train_flops_per_image
from model.pos_embed import resample_pos_embed
from model.variants import SIZES, ViTShape, grid_problem, parse_variant, resolution_problem
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
    "grid_problem",
    "load_checkpoint",
    "npz_architecture",
    "npz_shapes",
    "param_count",
    "parse_variant",
    "resample_pos_embed",
    "resolution_problem",
    "train_flops_per_image",
]
