"""The analytic FLOP count against an independent one: PyTorch's FlopCounterMode on the real forward pass.

On CPU, FlopCounterMode has no formula for the fused attention kernel, so the test registers PyTorch's own
``sdpa_flop_count`` for it: every matrix product of the model is then counted by PyTorch, none by us.
"""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from model import create_vit, flops

aten = torch.ops.aten


def _cpu_sdpa_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _counted_flops(fn, x: torch.Tensor) -> int:
    mapping = {aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        fn(x)
    counts = counter.get_flop_counts()["Global"]
    assert aten._scaled_dot_product_flash_attention_for_cpu in counts, "the attention kernel was not counted"
    return counter.get_total_flops() // x.shape[0]


CASES = [
    ("Ti/16", 32, "token", None, 10),
    ("Ti/16", 64, "token", None, 10),
    ("Ti/16", 96, "token", 64, 7),
    ("Ti/16", 64, "gap", None, 5),
    ("Mi/4", 32, "token", 48, 10),
    ("Ti/8", 48, "gap", 32, 3),
]


@pytest.mark.parametrize(("variant", "img_size", "pool", "representation", "classes"), CASES)
def test_analytic_flops_equal_pytorchs_count_of_the_full_and_the_executed_forward_pass(
    variant, img_size, pool, representation, classes
):
    shape = {"num_classes": classes, "pool": pool, "representation_size": representation}
    model = create_vit(variant, img_size=img_size, **shape).eval()
    x = torch.randn(2, 3, img_size, img_size)
    full = flops(variant, img_size, **shape)
    executed = flops(variant, img_size, **shape, cls_only_last_block=True)
    assert _counted_flops(lambda images: model.forward_head(model.forward_features(images)), x) == full
    assert _counted_flops(model, x) == executed
    if pool == "token":
        assert executed < full  # the class-token shortcut saves most of one block's work
    else:
        assert executed == full
