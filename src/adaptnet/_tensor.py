"""Change a parameter's contents (shape included) while keeping the Parameter object."""

from __future__ import annotations

import torch
from torch import nn

from adaptnet.errors import EditError


def set_parameter(param: torch.Tensor, value: torch.Tensor) -> None:
    """Make ``param`` hold ``value`` (any shape); ``param`` stays the same Python object.

    ``torch.utils.swap_tensors`` is used rather than ``param.data = value``: it also gives
    the parameter fresh autograd metadata, so a graph kept alive from before the edit
    cannot make the next backward fail on the old shape. Every reference to ``param`` (the
    optimizer's, an EMA copy's) stays valid. ``.grad`` is cleared; callers set it again.
    """
    fresh = nn.Parameter(value, requires_grad=param.requires_grad)
    fresh.__dict__.update(param.__dict__)  # keep attributes users set on the Parameter
    try:
        torch.utils.swap_tensors(param, fresh)
    except RuntimeError as err:
        raise EditError(
            "a graph built before the edit still uses this parameter (an output that was never "
            "backpropagated), or a wrapper such as DistributedDataParallel holds it; call backward() or "
            "drop those outputs (and the wrapper: edit the bare module, then wrap it again) before editing"
        ) from err
