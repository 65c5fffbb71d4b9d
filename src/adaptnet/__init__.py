"""adaptnet: adaptive neural networks on PyTorch.

Networks that change their structure while they learn (widen, prune, deepen, with the
optimizer's state carried over) and the tools to train, checkpoint and inspect them.
"""

from adaptnet.edit import Edit, IndexMap, deepen, prune, register_layer, register_optimizer, remove_layer, widen
from adaptnet.errors import EditError
from adaptnet.nn import AdaptiveCNN, AdaptiveMLP, UnitGroup, model_from_spec, register_model

__version__ = "0.1.0"

__all__ = [
    "AdaptiveCNN",
    "AdaptiveMLP",
    "Edit",
    "EditError",
    "IndexMap",
    "UnitGroup",
    "deepen",
    "model_from_spec",
    "prune",
    "register_layer",
    "register_model",
    "register_optimizer",
    "remove_layer",
    "widen",
]
