"""The two variable-length tasks of the ``sequences`` recipe, as padded batches.

parity    ``L`` random bits, one token per bit (one-hot, 2 features); the target is the parity
          of the number of ones, one label per sequence (the last token's prediction).
addition  two random ``L``-digit numbers ``a`` and ``b`` (uniform digits, leading zeros
          allowed), aligned digit by digit, least significant first: token ``t`` is the
          one-hot of ``a_t`` next to the one-hot of ``b_t`` (20 features), and its target is
          digit ``t`` of ``a + b``. One more token ``(0, 0)`` closes the sequence; its target
          is the final carry. So ``L`` digits make ``L + 1`` tokens, each with a target
          (as in Graves' ACT addition task, the carry must be held from token to token).

``length`` below is ``L``: bits for parity, digits per number for addition.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.nn import functional as F

from adaptnet.nn.sequences import pad_sequences

TASKS = ("parity", "addition")
FEATURES = {"parity": 2, "addition": 20}
CLASSES = {"parity": 2, "addition": 10}
PAD_TARGET = -1  # never a class: a padded target that reached a loss would raise


def tokens(task: str, length: int) -> int:
    """How many tokens a sequence of ``length`` bits or digits has."""
    return length + 1 if task == "addition" else length


def encode_parity(bits: Sequence[int]) -> tuple[torch.Tensor, int]:
    """``(L, 2)`` one-hot tokens and the parity of ``bits``."""
    x = F.one_hot(torch.tensor(list(bits), dtype=torch.long), 2).float()
    return x, sum(bits) % 2


def digits_of(n: int, count: int) -> list[int]:
    """The ``count`` lowest decimal digits of ``n``, least significant first."""
    return [(n // 10**i) % 10 for i in range(count)]


def encode_addition(a: int, b: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L + 1, 20)`` tokens for ``a + b`` with ``L``-digit operands and the ``(L + 1,)`` sum digits."""
    if not (0 <= a < 10**length and 0 <= b < 10**length):
        raise ValueError(f"{a} and {b} must have at most {length} digits")
    da, db = [*digits_of(a, length), 0], [*digits_of(b, length), 0]  # the closing (0, 0) token
    x = torch.cat([F.one_hot(torch.tensor(da), 10), F.one_hot(torch.tensor(db), 10)], dim=1).float()
    return x, torch.tensor(digits_of(a + b, length + 1))


def sample(task: str, lengths: Sequence[int], generator: torch.Generator
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A padded batch: ``x`` ``(B, T, F)``, token ``lengths`` ``(B,)`` and targets.

    Targets are ``(B,)`` parities, or ``(B, T)`` sum digits with ``PAD_TARGET`` on padding.
    """
    xs, ys = [], []
    for length in lengths:
        if task == "parity":
            bits = torch.randint(0, 2, (int(length),), generator=generator).tolist()
            x, parity = encode_parity(bits)
            xs.append(x)
            ys.append(torch.tensor(parity))
        else:
            a, b = (int("".join(map(str, torch.randint(0, 10, (int(length),), generator=generator).tolist())))
                    for _ in range(2))
            x, y = encode_addition(a, b, int(length))
            xs.append(x)
            ys.append(y)
    x, token_lengths = pad_sequences(xs)
    if task == "parity":
        return x, token_lengths, torch.stack(ys)
    return x, token_lengths, torch.nn.utils.rnn.pad_sequence(ys, batch_first=True, padding_value=PAD_TARGET)
