"""adaptnet: adaptive neural networks on PyTorch.

Networks that change their structure while they learn (widen, prune, deepen, with the
optimizer's state carried over), policies that decide when and where, and the tools to
train, checkpoint and inspect them.
"""

from adaptnet.edit import (
    Edit,
    IndexMap,
    deepen,
    grow_experts,
    prune,
    register_layer,
    register_optimizer,
    remove_layer,
    widen,
)
from adaptnet.errors import EditError
from adaptnet.groups import unit_groups
from adaptnet.nn import (
    ACT,
    AdaptiveCNN,
    AdaptiveMLP,
    EarlyExit,
    MoE,
    PerToken,
    PonderNet,
    RecurrentStep,
    UnitGroup,
    adaptive_loss,
    calibrate_threshold,
    count_macs,
    model_from_spec,
    pad_sequences,
    register_model,
)
from adaptnet.policy import (
    DeepenOnPlateau,
    EditRequest,
    GrowEvery,
    GrowOnPlateau,
    GrowOnSignal,
    Policy,
    PruneToBudget,
    Signals,
    register_policy,
)
from adaptnet.train.callbacks import Callback
from adaptnet.train.checkpoint import CheckpointError, CheckpointManager, load, restore_optimizer, save
from adaptnet.train.trainer import Trainer, TrainingError

__version__ = "0.1.0"

__all__ = [
    "ACT",
    "AdaptiveCNN",
    "AdaptiveMLP",
    "Callback",
    "CheckpointError",
    "CheckpointManager",
    "DeepenOnPlateau",
    "EarlyExit",
    "Edit",
    "EditError",
    "EditRequest",
    "GrowEvery",
    "GrowOnPlateau",
    "GrowOnSignal",
    "IndexMap",
    "MoE",
    "PerToken",
    "Policy",
    "PonderNet",
    "PruneToBudget",
    "RecurrentStep",
    "Signals",
    "Trainer",
    "TrainingError",
    "UnitGroup",
    "adaptive_loss",
    "calibrate_threshold",
    "count_macs",
    "deepen",
    "grow_experts",
    "load",
    "model_from_spec",
    "pad_sequences",
    "prune",
    "register_layer",
    "register_model",
    "register_optimizer",
    "register_policy",
    "remove_layer",
    "restore_optimizer",
    "save",
    "unit_groups",
    "widen",
]
