"""A zoo of small models that adaptnet should trace and edit, built without downloads.

Each entry builds a fresh, seeded instance (``build(seed)``) and its example inputs. Widths are
16-64 and depth 2 everywhere, so every model traces in well under a second on a CPU. The
Hugging Face models come from small configs (random weights, nothing downloaded); dropout is 0
so that outputs in train mode are deterministic.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


# -- plain containers ----------------------------------------------------------------------
class SeedNet(nn.Module):
    """The seed's ``AdaptiveNet(10, 50, 1)`` as it was written."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(10, 50)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(50, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 10) -> (B, 1)
        return self.fc2(self.relu(self.fc1(x)))


def sequential_mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 1))


# -- ResNet-style ----------------------------------------------------------------------------
class BasicBlock(nn.Module):
    """relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)); a 1x1 conv + BN shortcut when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNetStyle(nn.Module):
    def __init__(self, width: int = 16, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.layer1 = nn.Sequential(BasicBlock(width, width), BasicBlock(width, width))
        self.layer2 = nn.Sequential(BasicBlock(width, 2 * width, stride=2))  # the stage change: 1x1 shortcut
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, classes)
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


# -- MobileNet-style -------------------------------------------------------------------------
class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, reduced: int):
        super().__init__()
        self.reduce = nn.Conv2d(channels, reduced, 1)
        self.expand = nn.Conv2d(reduced, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # a per-channel gate in (0, 1)
        s = x.mean((2, 3), keepdim=True)
        return x * torch.sigmoid(self.expand(F.relu(self.reduce(s))))


class InvertedResidual(nn.Module):
    """Pointwise expand -> depthwise 3x3 -> SE gate -> pointwise project, residual when shapes allow."""

    def __init__(self, cin: int, cout: int, expand: int = 4, stride: int = 1):
        super().__init__()
        hidden = cin * expand
        self.expand = nn.Sequential(nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6())
        self.depthwise = nn.Sequential(nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
                                       nn.BatchNorm2d(hidden), nn.ReLU6())
        self.se = SqueezeExcite(hidden, max(4, hidden // 4))
        self.project = nn.Sequential(nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.se(self.depthwise(self.expand(x))))
        return x + out if self.residual else out


class MobileNetStyle(nn.Module):
    def __init__(self, width: int = 16, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU6())
        self.blocks = nn.Sequential(InvertedResidual(width, width), InvertedResidual(width, width))
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        return self.head(x.mean((2, 3)))


# -- ConvNeXt-style --------------------------------------------------------------------------
class ConvNeXtBlock(nn.Module):
    """dwconv 7x7 -> LayerNorm over channels (NHWC via permute) -> Linear 4x -> GELU -> Linear -> gamma, residual."""

    def __init__(self, dim: int, scale: float = 0.1):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(scale * torch.ones(dim))  # layer scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W)
        y = self.dwconv(x).permute(0, 2, 3, 1)  # (B, H, W, C)
        y = self.gamma * self.pwconv2(F.gelu(self.pwconv1(self.norm(y))))
        return x + y.permute(0, 3, 1, 2)


class ConvNeXtStyle(nn.Module):
    def __init__(self, dim: int = 16, classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 4, stride=4)  # patchify
        self.stem_norm = nn.LayerNorm(dim, eps=1e-6)
        self.blocks = nn.Sequential(ConvNeXtBlock(dim), ConvNeXtBlock(dim))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem_norm(self.stem(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        x = self.blocks(x)
        return self.head(self.norm(x.mean((2, 3))))


# -- ViT-style (hand-written attention) ------------------------------------------------------
class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)  # fused q, k, v
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, C)
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)  # (3, B, H, N, hd)
        q, k, v = qkv.unbind(0)
        attn = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
        out = attn.softmax(-1) @ v  # (B, H, N, hd)
        return self.proj(out.transpose(1, 2).reshape(b, n, -1))


class ViTBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp), nn.GELU(), nn.Linear(mlp, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pre-norm
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViTStyle(nn.Module):
    def __init__(self, dim: int = 32, heads: int = 4, image: int = 16, patch: int = 4, classes: int = 10):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(0.02 * torch.randn(1, 1, dim))
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, (image // patch) ** 2 + 1, dim))
        self.blocks = nn.Sequential(ViTBlock(dim, heads, 2 * dim), ViTBlock(dim, heads, 2 * dim))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, N, C)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


# -- ViT-style with nn.MultiheadAttention ----------------------------------------------------
class MHABlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp), nn.GELU(), nn.Linear(mlp, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class ViTMHA(ViTStyle):
    def __init__(self, dim: int = 32, heads: int = 4, image: int = 16, patch: int = 4, classes: int = 10):
        super().__init__(dim, heads, image, patch, classes)
        self.blocks = nn.Sequential(MHABlock(dim, heads, 2 * dim), MHABlock(dim, heads, 2 * dim))


# -- nn.TransformerEncoder -------------------------------------------------------------------
def transformer_encoder() -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, dropout=0.0, batch_first=True, norm_first=True)
    return nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(32), enable_nested_tensor=False)


# -- U-Net-style: the remaining patterns -----------------------------------------------------
class UNetStyle(nn.Module):
    """GroupNorm, a grouped conv, ConvTranspose2d, a concatenated skip, a GLU (chunk), flatten into Linear."""

    def __init__(self, c: int = 16, classes: int = 10):
        super().__init__()
        self.enc = nn.Sequential(nn.Conv2d(3, c, 3, 1, 1), nn.GroupNorm(4, c), nn.ReLU())
        self.down = nn.Conv2d(c, 2 * c, 3, 2, 1)
        self.grouped = nn.Conv2d(2 * c, 2 * c, 3, 1, 1, groups=4)
        self.up = nn.ConvTranspose2d(2 * c, c, 2, stride=2)
        self.fuse = nn.Conv2d(2 * c, 2 * c, 1)  # reads cat([up, skip]); its output is split in two halves
        self.head = nn.Linear(c * 4 * 4, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, 16, 16)
        skip = self.enc(x)  # (B, c, 16, 16)
        y = self.up(F.relu(self.grouped(F.relu(self.down(skip)))))  # (B, c, 16, 16)
        a, b = self.fuse(torch.cat([y, skip], dim=1)).chunk(2, dim=1)  # GLU
        y = a * torch.sigmoid(b)
        return self.head(F.adaptive_avg_pool2d(y, 4).flatten(1))  # (B, c*16) -> (B, classes)


# -- Hugging Face transformers, from small configs -------------------------------------------
VOCAB, SEQ = 128, 16


def gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))


def llama_gqa() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=32, tie_word_embeddings=False))


def bert() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification
    return BertForSequenceClassification(BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=2))


def opt() -> nn.Module:
    from transformers import OPTConfig, OPTForCausalLM
    return OPTForCausalLM(OPTConfig(vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                    num_attention_heads=4, max_position_embeddings=32, word_embed_proj_dim=32,
                                    dropout=0.0, attention_dropout=0.0, activation_dropout=0.0))


# -- the zoo ---------------------------------------------------------------------------------
def _image(size: int = 16) -> Callable[[], tuple[torch.Tensor, ...]]:
    return lambda: (torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0)),)


def _tokens() -> tuple[torch.Tensor, ...]:
    return (torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(0)),)


@dataclass(frozen=True)
class Entry:
    name: str
    make: Callable[[], nn.Module]
    inputs: Callable[[], tuple[Any, ...]]
    block: str | None  # a block of a stack, for deepen
    patterns: str

    def build(self, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        return self.make()


ZOO: list[Entry] = [
    Entry("seed class", SeedNet, lambda: (torch.randn(8, 10, generator=torch.Generator().manual_seed(0)),), None,
          "fc1 -> relu -> fc2"),
    Entry("nn.Sequential MLP", sequential_mlp,
          lambda: (torch.randn(8, 10, generator=torch.Generator().manual_seed(0)),), None, "Linear/ReLU stack"),
    Entry("ResNet-style", ResNetStyle, _image(), "layer1.0",
          "conv+BN basic blocks, residual adds, 1x1 downsampling shortcut, global average pool"),
    Entry("MobileNet-style", MobileNetStyle, _image(), "blocks.0",
          "pointwise + depthwise conv, BN, squeeze-excitation gate, residual"),
    Entry("ConvNeXt-style", ConvNeXtStyle, _image(), "blocks.0",
          "depthwise 7x7, LayerNorm over channels via permute, inverted MLP, layer scale gamma"),
    Entry("U-Net-style", UNetStyle, _image(), None,
          "GroupNorm, grouped conv, ConvTranspose2d, concatenated skip, GLU chunk, flatten into Linear"),
    Entry("ViT-style", ViTStyle, _image(), "blocks.0",
          "patch conv, cls token, position table, fused-qkv attention by hand, pre-norm"),
    Entry("ViT-style, nn.MultiheadAttention", ViTMHA, _image(), "blocks.0",
          "as ViT-style with nn.MultiheadAttention blocks"),
    Entry("nn.TransformerEncoder", transformer_encoder,
          lambda: (torch.randn(2, SEQ, 32, generator=torch.Generator().manual_seed(0)),), "layers.0",
          "norm_first=True, nn.MultiheadAttention, final LayerNorm"),
    Entry("HF GPT-2", gpt2, _tokens, "transformer.h.0", "Conv1D fused qkv, tied lm_head, learned positions"),
    Entry("HF Llama (GQA)", llama_gqa, _tokens, "model.layers.0",
          "RMSNorm, rotary, 4 query heads / 2 key-value heads, SwiGLU"),
    Entry("HF BERT", bert, _tokens, "bert.encoder.layer.0", "post-norm, token-type and position tables, pooler"),
    Entry("HF OPT", opt, _tokens, "model.decoder.layers.0",
          "separate q/k/v, learned positions with offset, tied lm_head"),
]
