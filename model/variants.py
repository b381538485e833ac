"""ViT sizes by name ("B/16" = Base width/depth/heads with 16x16 patches).

The sizes are Table 1 of the ViT paper plus Ti/S from "How to train your ViT" (the same table
big_vision's `decode_variant` uses), and a micro size "Mi" that trains in seconds on a laptop CPU.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class ViTShape:
    """Transformer hyper-parameters fixed by a variant name such as "B/16"."""

    size: str  # "B"
    patch_size: int  # 16
    width: int  # hidden size D
    depth: int  # number of encoder blocks
    num_heads: int
    mlp_dim: int

    @property
    def name(self) -> str:
        return f"{self.size}/{self.patch_size}"

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads


# size -> (width, depth, heads, mlp_dim)
SIZES: dict[str, tuple[int, int, int, int]] = {
    "Mi": (128, 6, 4, 512),  # CPU demo only; not from the paper
    "Ti": (192, 12, 3, 768),
    "S": (384, 12, 6, 1536),
    "B": (768, 12, 12, 3072),
    "L": (1024, 24, 16, 4096),
    "H": (1280, 32, 16, 5120),
}


def parse_variant(name: str) -> ViTShape:
    """Turn "B/16" (or "ViT-B/16") into a ViTShape; any known size works with any patch size."""
    text = name.strip()
    if text.startswith(("ViT-", "vit-")):
        text = text[4:]
    size, sep, patch = text.partition("/")
    known = ", ".join(SIZES)
    if not sep or size not in SIZES:
        raise ValueError(
            f"Unknown ViT variant {name!r}: expected '<size>/<patch>' with size one of {known} "
            f"(e.g. 'B/16', 'L/16', 'H/14', or 'Mi/4' for the CPU demo)."
        )
    if not patch.isdigit() or int(patch) < 1:
        raise ValueError(f"Bad patch size in ViT variant {name!r}: expected a positive integer as in 'B/16'.")
    width, depth, heads, mlp_dim = SIZES[size]
    return ViTShape(size=size, patch_size=int(patch), width=width, depth=depth, num_heads=heads, mlp_dim=mlp_dim)


def resolution_problem(img_size: int, variant: str | ViTShape, *, field: str = "img_size") -> str | None:
    """Why ``img_size`` cannot be cut into whole patches of ``variant`` (naming ``field`` and sizes that can), or None.

    Every resolution check in the pipeline (the pretraining config, the planner, transfer recipes) uses this.
    """
    shape = variant if isinstance(variant, ViTShape) else parse_variant(variant)
    return grid_problem(img_size, shape.patch_size, field=field, model=shape.name)


def grid_problem(img_size: int, patch_size: int, *, field: str = "img_size", model: str | None = None) -> str | None:
    """Why ``img_size`` cannot be cut into whole ``patch_size`` patches (naming sizes that can), or None."""
    if img_size % patch_size == 0 and img_size > 0:
        return None
    below = img_size // patch_size * patch_size
    choices = f"{below} or {below + patch_size}" if below else str(patch_size)
    of = f" of {model}" if model else ""
    return f"{field}={img_size} is not a multiple of the patch size {patch_size}{of}: use e.g. {choices}"
