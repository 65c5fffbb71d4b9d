"""What a model is made of: adaptive modules that declare their unit groups, and modules that
do a different amount of work for each input."""

from adaptnet.nn.activations import ACTIVATIONS, ReLU, make_activation
from adaptnet.nn.blocks import Block, ResidualBlock
from adaptnet.nn.cnn import AdaptiveCNN
from adaptnet.nn.early_exit import EarlyExit, ExitStats, calibrate_threshold
from adaptnet.nn.flops import count_macs
from adaptnet.nn.groups import Slice, UnitGroup
from adaptnet.nn.halting import ACT, PonderNet, RecurrentStep
from adaptnet.nn.losses import adaptive_loss
from adaptnet.nn.mlp import AdaptiveMLP
from adaptnet.nn.moe import MoE, MoEStats
from adaptnet.nn.registry import model_from_spec, register_model
from adaptnet.nn.sequences import PerToken, lengths_to_mask, pad_sequences
from adaptnet.nn.serialize import module_from_spec, module_spec, register_layer_spec

__all__ = [
    "ACT",
    "ACTIVATIONS",
    "AdaptiveCNN",
    "AdaptiveMLP",
    "Block",
    "EarlyExit",
    "ExitStats",
    "MoE",
    "MoEStats",
    "PerToken",
    "PonderNet",
    "ReLU",
    "RecurrentStep",
    "ResidualBlock",
    "Slice",
    "UnitGroup",
    "adaptive_loss",
    "calibrate_threshold",
    "count_macs",
    "lengths_to_mask",
    "make_activation",
    "model_from_spec",
    "module_from_spec",
    "module_spec",
    "pad_sequences",
    "register_layer_spec",
    "register_model",
]
