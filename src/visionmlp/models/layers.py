"""Pieces shared by several families' reference maths: the input-size check of models built for one image size."""

import torch
from timm.layers import register_notrace_function

__all__ = ["check_input_size"]


@register_notrace_function  # an FX leaf: the check branches on the input's size
def check_input_size(x: torch.Tensor, img_size: tuple[int, int], multiple: int) -> torch.Tensor:
    """``x``, or a ValueError naming the fix unless its height and width are ``img_size``.

    For models whose token-mixing weights are sized for the token grid at ``img_size``; ``multiple`` is the step of
    the sizes such a model can be built for. Returning ``x`` keeps the check in traced graphs.
    """
    height, width = x.shape[-2], x.shape[-1]
    if height != img_size[0] or width != img_size[1]:
        raise ValueError(
            f"input is {height}x{width} but the model was built for img_size=({img_size[0]}, {img_size[1]}): its "
            f"token-mixing weights are sized for that token grid. Resize the input to {img_size[0]}x{img_size[1]}, "
            f"or build the model with img_size=({height}, {width}) if each side is a multiple of {multiple}")
    return x
