"""How structure changes: unit groups, index maps, initialisers, optimizer-state migration."""

from adaptnet.edit._apply import apply_index_map, register_layer
from adaptnet.edit.experts import grow_experts
from adaptnet.edit.importance import IMPORTANCES
from adaptnet.edit.index_map import IndexMap
from adaptnet.edit.init import INITS
from adaptnet.edit.ops import deepen, prune, remove_layer, widen
from adaptnet.edit.optim import register_optimizer
from adaptnet.edit.record import Edit

__all__ = [
    "IMPORTANCES",
    "INITS",
    "Edit",
    "IndexMap",
    "apply_index_map",
    "deepen",
    "grow_experts",
    "prune",
    "register_layer",
    "register_optimizer",
    "remove_layer",
    "widen",
]
