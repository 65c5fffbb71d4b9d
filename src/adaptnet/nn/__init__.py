"""What a model is made of: adaptive modules that declare their unit groups."""

from adaptnet.nn.activations import ACTIVATIONS, ReLU, make_activation
from adaptnet.nn.blocks import Block, ResidualBlock
from adaptnet.nn.cnn import AdaptiveCNN
from adaptnet.nn.groups import Slice, UnitGroup
from adaptnet.nn.mlp import AdaptiveMLP
from adaptnet.nn.registry import model_from_spec, register_model

__all__ = [
    "ACTIVATIONS",
    "AdaptiveCNN",
    "AdaptiveMLP",
    "Block",
    "ReLU",
    "ResidualBlock",
    "Slice",
    "UnitGroup",
    "make_activation",
    "model_from_spec",
    "register_model",
]
