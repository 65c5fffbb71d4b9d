"""Small models, one per pattern that unit groups are found through (tests/groups)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Seed(nn.Module):
    """The seed article's class: fc1 -> relu -> fc2."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(10, 50)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(50, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.relu(self.fc1(x)))


class Convs(nn.Module):
    """Conv1d, then Conv2d with BatchNorm, a depthwise conv (channels tied across groups), and a
    flatten into a Linear (a channel owns H*W columns)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(3, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.fc = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, 3, 16)
        h = torch.relu(self.c1(x)).unflatten(2, (4, 4))  # (B, C, 4, 4)
        h = torch.relu(self.bn(self.c2(h)))
        h = torch.tanh(self.dw(h))
        return self.fc(h.flatten(1))


class Grouped(nn.Module):
    """A grouped conv: a unit is one group (its input and output channels), groups = units."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.grouped = nn.Conv2d(8, 6, 3, padding=1, groups=2)
        self.head = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.grouped(torch.relu(self.a(x)))).mean(dim=(2, 3)))


class Decoder(nn.Module):
    """ConvTranspose layers (weight (in, out, k, k)) with BatchNorm between them."""

    def __init__(self) -> None:
        super().__init__()
        self.up1 = nn.ConvTranspose2d(4, 8, 2, stride=2)
        self.bn = nn.BatchNorm2d(8)
        self.up2 = nn.ConvTranspose2d(8, 3, 2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up2(torch.relu(self.bn(self.up1(x))))


class Norms(nn.Module):
    """LayerNorm, RMSNorm and GroupNorm over hidden units: groups whose units are mixed."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 8)
        self.ln = nn.LayerNorm(8)
        self.b = nn.Linear(8, 8)
        self.rms = nn.RMSNorm(8)
        self.c = nn.Conv1d(1, 4, 1)
        self.gn = nn.GroupNorm(2, 4)
        self.out = nn.Linear(8 + 4 * 6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.rms(torch.relu(self.b(self.ln(self.a(x)))))
        g = self.gn(self.c(x[:, None, :])).flatten(1)
        return self.out(torch.cat([h, g], dim=1))


class Branches(nn.Module):
    """Two branches concatenated, a fused projection split in two (offsets), a residual stream."""

    def __init__(self) -> None:
        super().__init__()
        self.left = nn.Linear(5, 6)
        self.right = nn.Linear(5, 3)
        self.fused = nn.Linear(9, 2 * 7)  # gate and value halves
        self.proj = nn.Linear(7, 9)
        self.head = nn.Linear(9, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.cat([torch.relu(self.left(x)), torch.tanh(self.right(x))], dim=1)  # (B, 9)
        gate, value = self.fused(h).chunk(2, dim=1)
        h = h + self.proj(F.silu(gate) * value)  # residual
        return self.head(h)


class Attention(nn.Module):
    """Hand-written attention with separate q/k/v (a head is one unit) and a fused-qkv variant;
    SDPA, or softmax(q k^T / sqrt(d)) v written by hand (``sdpa=False``)."""

    def __init__(self, fused: bool, d: int = 16, heads: int = 4, sdpa: bool = True):
        super().__init__()
        self.heads, self.head_dim, self.fused, self.sdpa = heads, d // heads, fused, sdpa
        self.embed = nn.Embedding(11, d)
        if fused:
            self.qkv = nn.Linear(d, 3 * d)
        else:
            self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.o = nn.Linear(d, d)
        self.head = nn.Linear(d, 11)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)  # (B, T, d)
        b, t, _ = x.shape
        if self.fused:
            q, k, v = self.qkv(x).chunk(3, dim=-1)
        else:
            q, k, v = self.q(x), self.k(x), self.v(x)
        q, k, v = (z.view(b, t, -1, self.head_dim).transpose(1, 2) for z in (q, k, v))  # (B, H, T, D)
        if self.sdpa:
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            a = torch.softmax(q @ k.transpose(-2, -1) / self.head_dim**0.5, dim=-1) @ v
        a = a.transpose(1, 2).reshape(b, t, -1)
        return self.head(x + self.o(a))


class Tied(nn.Module):
    """An embedding whose weight is also the output layer's (tied weights)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(12, 8)
        self.mix = nn.Linear(8, 8)
        self.out = nn.Linear(8, 12, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        return self.out(x + torch.tanh(self.mix(x)))


class SqueezeExcite(nn.Module):
    """A conv whose channels are gated by a squeeze-excitation branch."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.squeeze = nn.Linear(8, 2)
        self.excite = nn.Linear(2, 8)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x))  # (B, C, H, W)
        gate = torch.sigmoid(self.excite(torch.relu(self.squeeze(h.mean(dim=(2, 3))))))  # (B, C)
        h = h * gate[:, :, None, None]
        return self.head(h.mean(dim=(2, 3)))


class TokensAndPositions(nn.Module):
    """ViT-style: patch embedding, a cls token and a position table used directly, no norm."""

    def __init__(self, d: int = 8):
        super().__init__()
        self.patch = nn.Conv2d(1, d, 4, stride=4)
        self.cls = nn.Parameter(torch.randn(1, 1, d))
        self.pos = nn.Parameter(torch.randn(1, 5, d))
        self.mlp1 = nn.Linear(d, 2 * d)
        self.mlp2 = nn.Linear(2 * d, d)
        self.head = nn.Linear(d, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, 1, 8, 8)
        tokens = self.patch(x).flatten(2).transpose(1, 2)  # (B, 4, d)
        h = torch.cat([self.cls.expand(x.shape[0], -1, -1), tokens], dim=1) + self.pos
        h = h + self.mlp2(F.gelu(self.mlp1(h)))
        return self.head(h[:, 0])


class PreNormTokens(TokensAndPositions):
    """The same with pre-norm blocks and a final LayerNorm: a stream that new channels can carry."""

    def __init__(self, d: int = 8):
        super().__init__(d)
        self.ln1, self.ln_f = nn.LayerNorm(d), nn.LayerNorm(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, 1, 8, 8)
        tokens = self.patch(x).flatten(2).transpose(1, 2)  # (B, 4, d)
        h = torch.cat([self.cls.expand(x.shape[0], -1, -1), tokens], dim=1) + self.pos
        h = h + self.mlp2(F.gelu(self.mlp1(self.ln1(h))))
        return self.head(self.ln_f(h)[:, 0])


class ResidualStack(nn.Module):
    """Pre-norm residual blocks in an nn.Sequential, and post-activation ResNet blocks in a ModuleList."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(5, 8)
        self.blocks = nn.Sequential(PreNorm(8), PreNorm(8))
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


class PreNorm(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.up = nn.Linear(d, 2 * d)
        self.down = nn.Linear(2 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.relu(self.up(self.norm(x))))


class BasicBlock(nn.Module):
    """relu(bn2(conv2(relu(bn1(conv1(x))))) + x): a post-activation ResNet block."""

    def __init__(self, c: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))) + x)


class ResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.layers = nn.ModuleList([BasicBlock(6), BasicBlock(6)])
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        for block in self.layers:
            x = block(x)
        return self.head(x.mean(dim=(2, 3)))


class PostNormBlock(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.f, self.norm = nn.Linear(d, d), nn.LayerNorm(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.f(x))


class PostNorm(nn.Module):
    """norm(x + f(x)) blocks: not residual in the sense deepen needs."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(PostNormBlock(8), PostNormBlock(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class HardCoded(nn.Module):
    """Writes a size into its code: widening fc1 breaks its forward."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x).view(-1, 2, 3).sum(dim=1))


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        return h * 2 if h.sum() > 0 else h


class EagerAttention(nn.Module):
    """Attention written by hand (matmul, softmax), heads by view(b, t, -1, d), q/k/v by unbind."""

    def __init__(self, d: int = 16, head_dim: int = 4):
        super().__init__()
        self.head_dim = head_dim
        self.qkv = nn.Linear(d, 3 * d)
        self.o = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, -1, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, T, D)
        weights = torch.softmax(q @ k.transpose(-2, -1) / self.head_dim**0.5, dim=-1)
        return x + self.o((weights @ v).transpose(1, 2).reshape(b, t, -1))


class FixedHeads(nn.Module):
    """Writes its number of heads down: view(b, -1, heads, d) lets the -1 take new heads."""

    def __init__(self, d: int = 16, heads: int = 4):
        super().__init__()
        self.heads, self.head_dim = heads, d // heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        q, k, v = (z.view(b, -1, self.heads, self.head_dim).transpose(1, 2) for z in (self.q(x), self.k(x), self.v(x)))
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2)
        return x + self.o(a.reshape(b, x.shape[1], -1))


class GroupedQuery(nn.Module):
    """Grouped-query attention written by hand: ``kv`` key/value heads, each shared by ``rep`` query
    heads, repeated by ``expand`` and ``reshape`` (Hugging Face's ``repeat_kv``) or left to SDPA
    (``enable_gqa=True``); ``kv=1`` is multi-query attention. ``matmul``: the repeated heads go to
    ``q @ k^T`` and ``weights @ v`` (Hugging Face's eager attention), not to SDPA."""

    def __init__(self, kv: int = 2, rep: int = 2, head_dim: int = 4, d: int = 16, sdpa_gqa: bool = False,
                 matmul: bool = False):
        super().__init__()
        self.rep, self.head_dim, self.sdpa_gqa, self.matmul = rep, head_dim, sdpa_gqa, matmul
        self.q = nn.Linear(d, kv * rep * head_dim)
        self.k, self.v = nn.Linear(d, kv * head_dim), nn.Linear(d, kv * head_dim)
        self.o = nn.Linear(kv * rep * head_dim, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = (z.view(b, t, -1, self.head_dim).transpose(1, 2) for z in (self.q(x), self.k(x), self.v(x)))
        if self.sdpa_gqa:
            a = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        else:
            k, v = (z[:, :, None].expand(b, z.shape[1], self.rep, t, self.head_dim).reshape(b, -1, t, self.head_dim)
                    for z in (k, v))
            if self.matmul:
                a = torch.softmax(q @ k.transpose(-2, -1) / self.head_dim**0.5, dim=-1) @ v
            else:
                a = F.scaled_dot_product_attention(q, k, v)
        return x + self.o(a.transpose(1, 2).reshape(b, t, -1))
