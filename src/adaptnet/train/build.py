"""From a ``Config`` to the objects of a run: data, model, loss, optimizer, scheduler, policies, Trainer.

``adaptnet train`` and ``adaptnet resume`` both go through ``build_run``, so a resumed run
is rebuilt exactly as it was started (the Trainer then swaps in the checkpoint's model).
"""

from __future__ import annotations

import itertools
import logging
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adaptnet.nn import AdaptiveCNN, AdaptiveMLP
from adaptnet.policy import Policy, make_policy
from adaptnet.train import _user_models
from adaptnet.train.callbacks import Callback
from adaptnet.train.config import CNNConfig, Config, ConfigError, HFModelConfig, OptimConfig, TargetModelConfig
from adaptnet.train.data import Splits, TaskInfo, load_data
from adaptnet.train.distributed import is_main_process, resolve_device
from adaptnet.train.metrics import METRICS, MetricFn
from adaptnet.train.trainer import LossFn, Trainer

logger = logging.getLogger(__name__)


@dataclass
class Run:
    """Everything ``Trainer.fit`` needs, built from one config."""

    config: Config
    data: Splits
    trainer: Trainer

    @property
    def epochs(self) -> int:
        return self.config.train.epochs


# Peak memory while drawing and splitting the synthetic and regression data sets, per row (measured:
# about 600 bytes for synthetic, 410 for regression, with 2 million rows).
_GENERATED_ROW_BYTES = 640


def load_splits(cfg: Config) -> Splits:
    """The config's data, split by its seed (images for a CNN).

    Raises:
        ConfigError: ``data.samples`` asks for more generated rows than the machine's memory holds.
    """
    d = cfg.data
    if d.name == "tokens":
        return _user_models.tokens(d.samples or 2000, cfg.seed, d.val_fraction, d.test_fraction)
    if d.samples is not None:
        need, available = d.samples * _GENERATED_ROW_BYTES, available_memory(torch.device("cpu"))
        if available is not None and need > available:
            raise ConfigError(f"data.samples: {d.samples:,} rows need about {_bytes(need)} of memory to draw and "
                              f"split, more than the {_bytes(available)} available; use fewer rows")
    return load_data(d.name, csv=d.csv, target=d.target, seed=cfg.seed, val_fraction=d.val_fraction,
                     test_fraction=d.test_fraction, standardize=d.standardize,
                     images=isinstance(cfg.model, CNNConfig), samples=d.samples)


def build_model(cfg: Config, info: TaskInfo) -> nn.Module:
    """The model at its starting size (initialised from ``cfg.seed``).

    Raises:
        ConfigError: the model cannot be built or trained in the memory of the run's device (the
            message says how much it would need); checked before anything is allocated.
    """
    m = cfg.model
    if isinstance(m, CNNConfig) and (info.image_shape is None or info.num_classes is None):
        raise ConfigError(f"model.type: cnn needs image classification data, got {info.name} ({info.task})")
    torch.manual_seed(cfg.seed)
    # A user's model and a transformers model are sized by their own code: built, then counted.
    if isinstance(m, TargetModelConfig):
        return _user_models.build_target(m)
    if isinstance(m, HFModelConfig):
        return _user_models.build_hf(m, info)
    check_model_size(cfg, info)
    return _construct(cfg, info)


def fresh_model(cfg: Config, source: str, trusted: bool) -> Callable[[], nn.Module] | None:
    """What a checkpoint of this run loads into: for a ``model.target`` or ``model.hf`` run, a function
    building the model at its starting size (``adaptnet.load(path, model=...)`` then reshapes it); None
    for adaptnet's own models, which rebuild themselves from the checkpoint.

    Raises:
        ConfigError: the config (read from ``source``) names code and ``trusted`` is False.
    """
    if not isinstance(cfg.model, (TargetModelConfig, HFModelConfig)):
        return None
    _user_models.require_trust(cfg.model, source, trusted)
    info = load_splits(cfg).info

    def build() -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            return build_model(cfg, info)

    return build


def _construct(cfg: Config, info: TaskInfo) -> nn.Module:
    m = cfg.model
    assert not isinstance(m, (TargetModelConfig, HFModelConfig))
    if isinstance(m, CNNConfig):
        assert info.image_shape is not None and info.num_classes is not None
        return AdaptiveCNN(info.image_shape[0], list(m.channels), info.num_classes, kernel_size=m.kernel_size,
                           norm=m.norm, pool=m.pool, activation=m.activation)
    return AdaptiveMLP(info.in_features, list(m.hidden), info.out_features, activation=m.activation, norm=m.norm,
                       dropout=m.dropout)


# Per-element optimizer state tensors (each the size of the parameters) besides the gradient.
_OPTIMIZER_STATES = {"sgd": 0, "adam": 2, "adamw": 2, "rmsprop": 1, "adagrad": 1}


def check_model_size(cfg: Config, info: TaskInfo) -> None:
    """``ConfigError`` when the model, or one growth step of a policy, exceeds the memory of the device.

    What a model needs to train: its weights, gradients and per-element optimizer state. A lower
    bound from the widths alone (Python integers: no overflow) refuses absurd sizes; a model that
    passes it is built on the ``meta`` device (no memory) and counted exactly. Then each growing
    policy's first edit (``by`` units, or a ``width``-wide new layer, within its ``max_width`` and
    ``max_params``) is bounded the same way, so that it does not fail to allocate mid-run.
    """
    m = cfg.model
    assert not isinstance(m, (TargetModelConfig, HFModelConfig))  # sized by their own code
    key = "model.channels" if isinstance(m, CNNConfig) else "model.hidden"
    if isinstance(m, CNNConfig):
        assert info.image_shape is not None and info.num_classes is not None
        sizes, area = [info.image_shape[0], *m.channels, info.num_classes], m.kernel_size**2
        bound = sum(a * b for a, b in itertools.pairwise(sizes[:-1])) * area + sizes[-2] * sizes[-1]
    else:
        sizes, area = [info.in_features, *m.hidden, info.out_features], 1
        bound = sum(a * b for a, b in itertools.pairwise(sizes))
    device = resolve_device(cfg.device)
    available = available_memory(device)
    if available is None:
        return
    states = _OPTIMIZER_STATES[cfg.optim.name] + int(cfg.optim.name in ("sgd", "rmsprop") and bool(cfg.optim.momentum))
    itemsize = torch.empty(0).element_size()  # the default dtype's

    def refuse(where: str, what: str, params: int, buffers: int = 0) -> None:
        weights = (params + buffers) * itemsize
        need = weights + params * itemsize * (1 + states)
        if need > available:
            raise ConfigError(
                f"{where}: {what} {params:,} parameters needs about {_bytes(need)} to train ({_bytes(weights)} "
                f"of weights, then gradients and {cfg.optim.name}'s state), more than the {_bytes(available)} of "
                f"memory available on {device.type}")

    refuse(key, "a model of at least", bound)
    try:
        with torch.device("meta"):
            model = _construct(cfg, info)
    except (RuntimeError, TypeError, OverflowError) as err:  # a size torch cannot even describe
        raise ConfigError(f"{key}: cannot build a model this large ({' '.join(str(err).split()[:12])})") from None
    params = sum(p.numel() for p in model.parameters())
    refuse(key, "a model of", params, sum(b.numel() for b in model.buffers()))
    # The least a new unit costs: its fan-in and fan-out (a new residual layer: 2 x its stream, per unit).
    per_unit = {"widen": min(a * area + b for a, b in zip(sizes[:-2], sizes[2:], strict=True)),
                "deepen": 2 * min(sizes[1:-1]) * area}
    for i, policy in enumerate(cfg.policies):
        option, op = ("by", "widen") if "by" in policy else ("width", "deepen")
        units = policy.get(option)
        if not isinstance(units, int):
            continue  # a policy that only prunes, or a new layer as wide as its stream (bounded above)
        if policy.get("max_width") is not None:
            units = min(units, policy["max_width"])
        after = params + units * per_unit[op]
        if policy.get("max_params") is not None:
            after = min(after, max(policy["max_params"], params))
        refuse(f"policies.{i}.{option}", f"one edit of {units:,} units makes a model of at least", after)


def available_memory(device: torch.device) -> int | None:
    """Bytes free for a run on ``device`` (CPU and MPS: the machine's available memory); None if unknown."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, OSError, ValueError):
        return None


def _bytes(n: int) -> str:
    """``52.0 TB``, ``3.1 GB``, ``12 kB`` (powers of 1000)."""
    if n < 1000:
        return f"{n} B"
    exp = min(int(math.log10(n) // 3), 8)
    unit = "kMGTPEZY"[exp - 1]
    return f"{n / 1000**exp:.1f} {unit}B"


def build_optimizer(optim: OptimConfig, model: nn.Module) -> torch.optim.Optimizer:
    """The configured optimizer over ``model.parameters()`` (edits carry its state along)."""
    params, lr, wd = model.parameters(), optim.lr, optim.weight_decay
    momentum = optim.momentum or 0.0
    betas = (optim.betas[0], optim.betas[1]) if optim.betas else (0.9, 0.999)
    if optim.name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=wd)
    if optim.name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=betas, weight_decay=wd)
    if optim.name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=wd)
    if optim.name == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, momentum=momentum, weight_decay=wd)
    return torch.optim.Adagrad(params, lr=lr, weight_decay=wd)


def build_scheduler(cfg: Config, optimizer: torch.optim.Optimizer) -> Any:
    """The LR scheduler (stepped once per epoch by the Trainer), or None."""
    s = cfg.scheduler
    if s.name == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=s.step_size, gamma=s.gamma)
    if s.name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=s.t_max or cfg.train.epochs,
                                                          eta_min=s.eta_min)
    return None


def build_policies(cfg: Config) -> list[Policy]:
    """Fresh policies from ``cfg.policies`` (entries already validated and resolved by ``Config``)."""
    return [make_policy(p["name"], {k: v for k, v in p.items() if k != "name"}) for p in cfg.policies]


def loss_and_metrics(info: TaskInfo, cfg: Config | None = None) -> tuple[LossFn, dict[str, MetricFn]]:
    """Cross-entropy and accuracy for classification (per token for a causal LM); MSE, MAE and R² for
    regression."""
    if info.name == "tokens" or (cfg is not None and isinstance(cfg.model, HFModelConfig)
                                 and cfg.model.task == "causal_lm"):
        return _user_models.causal_lm_loss, {"accuracy": _user_models.token_accuracy}
    if info.task == "classification":
        return nn.CrossEntropyLoss(), {"accuracy": METRICS["accuracy"]}
    return nn.MSELoss(), {"mae": METRICS["mae"], "r2": METRICS["r2"]}


def check_device(device: str) -> None:
    """``ConfigError`` when the configured device is not available here."""
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: cuda is not available on this machine; allowed here: auto, cpu")
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError("device: mps is not available on this machine; allowed here: auto, cpu")


def build_run(cfg: Config, run_dir: str | Path, *, progress: bool = False,
              callbacks: Iterable[Callback] = ()) -> Run:
    """Build data, model, optimizer, scheduler, policies and the Trainer of a run directory.

    Writes ``run_dir/config.yaml`` (the resolved config).
    """
    check_device(cfg.device)
    data = load_splits(cfg)
    model = build_model(cfg, data.info)
    optimizer = build_optimizer(cfg.optim, model)
    loss_fn, metrics = loss_and_metrics(data.info, cfg)
    extra = list(callbacks)
    if cfg.train.tensorboard and is_main_process():  # only rank 0 writes logs
        from adaptnet.train.tensorboard import TensorBoardCallback

        extra.append(TensorBoardCallback(Path(run_dir) / "tensorboard"))
    t = cfg.train
    trainer = Trainer(
        model, optimizer, loss_fn, build_policies(cfg), extra, build_scheduler(cfg, optimizer),
        metrics=metrics, run_dir=run_dir, seed=cfg.seed, batch_size=cfg.data.batch_size, device=cfg.device,
        compile=t.compile, checkpoint_every=t.checkpoint_every, keep_last=t.keep_last, on_nonfinite=t.on_nonfinite,
        lr_backoff=t.lr_backoff, max_rollbacks=t.max_rollbacks, grad_clip=t.grad_clip, probe_size=t.probe_size,
        progress=progress, config=cfg.to_dict(),
    )
    return Run(cfg, data, trainer)


@torch.no_grad()
def evaluate(trainer: Trainer, data: tuple[torch.Tensor, torch.Tensor], batch_size: int = 1024) -> dict[str, float]:
    """Loss and metrics of the trainer's current model on ``data`` (for example the test split)."""
    model, device = trainer.model, resolve_device(trainer.device)
    was_training = model.training
    model.eval()
    x, y = data
    outputs = torch.cat([model(x[i:i + batch_size].to(device)) for i in range(0, len(x), batch_size)])
    targets = y.to(device)
    result = {"loss": float(trainer.loss_fn(outputs, targets))}
    result.update({name: fn(outputs, targets) for name, fn in trainer.metrics.items()})
    model.train(was_training)
    return result
