"""Models a config names instead of adaptnet's own: ``model.target`` (a callable of the user's) and
``model.hf`` (a Hugging Face transformers model built from a config), and the token data set
``tokens`` a causal language model trains on.

Importing ``model.target`` runs the user's code. ``adaptnet train`` does it because the user gave
the config; ``adaptnet resume`` and ``inspect`` read a config out of a run directory, and do it
only with ``--trust-code`` (``require_trust``). ``model.hf`` builds transformers' own classes
(never ``trust_remote_code``) and imports nothing a file names.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adaptnet.train.config import TARGET, ConfigError, HFModelConfig, TargetModelConfig
from adaptnet.train.data import Pair, Splits, TaskInfo


def require_trust(model: Any, source: str, trusted: bool) -> None:
    """``ConfigError`` unless a config read from ``source`` names no code, or the user trusts it."""
    if isinstance(model, TargetModelConfig) and not trusted:
        raise ConfigError(f"{source} names model.target {model.target!r}: code that would be imported and run; "
                          "adaptnet imports it only if you say so: pass --trust-code")


def import_target(target: str) -> Callable[..., Any]:
    """``package.module:callable`` (dotted attributes allowed after the colon), imported from the
    installed packages or the working directory. One-line ``ConfigError`` when it does not resolve."""
    if not TARGET.fullmatch(target):
        raise ConfigError(f"model.target: must look like package.module:callable, got {target!r}")
    module_name, _, attr = target.partition(":")
    cwd = str(Path.cwd())
    added = cwd not in sys.path
    if added:  # like `python -m`: a module in the working directory is importable
        sys.path.insert(0, cwd)
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as err:  # the user's module may raise anything while importing
        raise ConfigError(f"model.target: cannot import {module_name!r} ({type(err).__name__}: {err})") from None
    finally:
        if added:
            sys.path.remove(cwd)
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"model.target: {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"model.target: {target!r} is a {type(obj).__name__}, not a callable")
    return obj


def build_target(m: TargetModelConfig) -> nn.Module:
    fn = import_target(m.target)
    try:
        model = fn(**m.kwargs)
    except Exception as err:
        raise ConfigError(f"model.kwargs: {m.target}(**kwargs) failed ({type(err).__name__}: {err})") from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model.target: {m.target} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


class HFLogits(nn.Module):
    """A transformers model as the Trainer sees models: token ids in, logits out.

    Inputs that are floats holding whole numbers (digits with ``data.standardize: false``) are
    taken as token ids. ``(B, T)`` -> ``(B, T, V)`` for a causal LM, ``(B, num_labels)`` for a classifier.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.model(input_ids=x.long()).logits
        return logits


def build_hf(m: HFModelConfig, info: TaskInfo) -> nn.Module:
    try:
        import transformers
    except ImportError:
        raise ConfigError("model.hf: needs transformers: pip install 'adaptnet[hf]'") from None
    causal = m.task == "causal_lm"
    auto = transformers.AutoModelForCausalLM if causal else transformers.AutoModelForSequenceClassification
    extra: dict[str, Any] = {"num_labels": info.num_classes} if m.task == "sequence_classification" else {}
    try:
        if isinstance(m.hf, str) and Path(m.hf).expanduser().is_dir():
            # A save_pretrained folder: its config and weights, never code (trust_remote_code stays False).
            model = auto.from_pretrained(str(Path(m.hf).expanduser()), local_files_only=True, **extra, **m.config)
        else:
            spec = {"model_type": m.hf} if isinstance(m.hf, str) else dict(m.hf)
            model_type = spec.pop("model_type", None)
            if not isinstance(model_type, str) or model_type not in transformers.CONFIG_MAPPING:
                raise ConfigError(f"model.hf: {model_type!r} is neither a local folder nor a transformers model type "
                                  "(gpt2, llama, bert, ...); a dict needs a model_type key")
            config = transformers.AutoConfig.for_model(model_type, **{**spec, **m.config, **extra})
            model = auto.from_config(config)
    except ConfigError:
        raise
    except Exception as err:
        raise ConfigError(f"model.hf: cannot build it ({type(err).__name__}: {' '.join(str(err).split())[:300]})") \
            from None
    vocab = getattr(model.config, "vocab_size", None)
    if m.task == "causal_lm" and vocab is not None and vocab < info.out_features:
        raise ConfigError(f"model.hf: vocab_size {vocab} is smaller than the data's {info.out_features} tokens")
    return HFLogits(model)


def causal_lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of ``(B, T, V)`` logits against ``(B, T)`` next tokens."""
    return nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())


def token_accuracy(logits: torch.Tensor, targets: torch.Tensor) -> float:
    return float((logits.argmax(dim=-1) == targets).to(torch.float64).mean())


# -- the tokens data set --------------------------------------------------------------------------
VOCAB, LENGTH = 32, 16


def tokens(samples: int, seed: int, val_fraction: float, test_fraction: float) -> Splits:
    """Sequences of a fixed random Markov chain (each token has 3 likely successors): next-token
    prediction that a small model learns in a few epochs. ``x``: ``(N, 15)`` ids, ``y``: ``x`` shifted by one."""
    g = torch.Generator().manual_seed(1234)  # the language is fixed; ``seed`` draws and splits the samples
    successors = torch.randint(0, VOCAB, (VOCAB, 3), generator=g)
    g.manual_seed(seed)
    seq = torch.empty(samples, LENGTH, dtype=torch.int64)
    seq[:, 0] = torch.randint(0, VOCAB, (samples,), generator=g)
    for t in range(1, LENGTH):
        choice = torch.randint(0, 3, (samples,), generator=g)
        seq[:, t] = successors[seq[:, t - 1], choice]
    order = torch.randperm(samples, generator=g)
    n_val, n_test = round(samples * val_fraction), round(samples * test_fraction)
    cut = samples - n_val - n_test

    def pair(idx: torch.Tensor) -> Pair | None:
        return (seq[idx, :-1], seq[idx, 1:]) if len(idx) else None

    train = pair(order[:cut])
    assert train is not None
    info = TaskInfo("tokens", "classification", LENGTH - 1, VOCAB, VOCAB)
    return Splits(train, pair(order[cut:cut + n_val]), pair(order[cut + n_val:]), info)
