"""The typed run configuration: YAML in, ``a.b=c`` overrides on top, one-line errors out.

A config names everything a run needs (data, model, optimizer, scheduler, training loop,
policies); ``adaptnet train`` builds them from it (``adaptnet.train.build``). Unknown keys,
wrong types and out-of-range values raise ``ConfigError`` with a message such as
``train.epochs: must be an integer >= 1, got -3``.

Example::

    cfg = load_config("examples/configs/wine.yaml", ["train.epochs=50", "model.hidden=[32,16]"])
    cfg.to_dict()  # resolved: every default filled in (written to run_dir/config.yaml)
"""

from __future__ import annotations

import functools
import inspect
import re
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator
from pydantic_core import PydanticCustomError

from adaptnet.policy import POLICIES, make_policy
from adaptnet.train._config_errors import OWN_ERROR, format_validation_error, show_value
from adaptnet.train.data import DATASETS

IMAGE_DATASETS = ("digits",)
PosInt = Annotated[int, Field(ge=1)]
# model.target: ``package.module:callable`` (dotted attributes after the colon); checked without importing.
TARGET = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


class ConfigError(ValueError):
    """A config is invalid; the message is one line naming the dotted key and what is allowed."""


class _Section(BaseModel):
    # strict: YAML already gives typed values; "3" for an integer is a mistake worth reporting.
    model_config = ConfigDict(extra="forbid", strict=True)


class DataConfig(_Section):
    """Which data, how it is split, and how it is batched."""

    # tokens: generated next-token sequences for model.hf with task causal_lm (adaptnet.train._user_models).
    name: Literal["synthetic", "regression", "digits", "wine", "breast_cancer", "diabetes", "tokens"] | None = None
    csv: str | None = None
    target: str | None = None
    samples: PosInt | None = None  # rows of the synthetic or regression data set (default 2000)
    val_fraction: float = Field(default=0.2, ge=0, lt=1)
    test_fraction: float = Field(default=0.2, ge=0, lt=1)
    batch_size: int = Field(default=64, ge=1)
    standardize: bool = True


class MLPConfig(_Section):
    type: Literal["mlp"] = "mlp"
    hidden: Annotated[list[PosInt], Field(min_length=1)] = [8]
    activation: Literal["relu", "leaky_relu", "gelu", "silu", "tanh"] = "relu"
    norm: Literal["batch", "layer"] | None = None
    dropout: float = Field(default=0.0, ge=0, lt=1)


class CNNConfig(_Section):
    type: Literal["cnn"]
    channels: Annotated[list[PosInt], Field(min_length=1)] = [8]
    kernel_size: Literal[1, 3, 5, 7] = 3
    norm: Literal["batch"] | None = "batch"
    pool: Literal["max", "avg"] | None = "max"
    activation: Literal["relu", "leaky_relu", "gelu", "silu", "tanh"] = "relu"


class TargetModelConfig(_Section):
    """A model of the user's: ``target: "package.module:callable"`` called with ``kwargs``.

    Imported from the installed packages or the working directory. ``adaptnet resume`` and
    ``inspect`` import it again only with ``--trust-code``.
    """

    type: Literal["target"]
    target: Annotated[str, Field(min_length=3)]
    kwargs: dict[str, Any] = Field(default_factory=dict)


class HFModelConfig(_Section):
    """A transformers model: ``hf`` is a model type (``gpt2``), a config dict with ``model_type``, or a
    local ``save_pretrained`` folder (weights loaded, nothing downloaded); ``config`` overrides fields."""

    type: Literal["hf"]
    hf: str | dict[str, Any]
    task: Literal["causal_lm", "sequence_classification"]
    config: dict[str, Any] = Field(default_factory=dict)


ModelConfig = MLPConfig | CNNConfig | TargetModelConfig | HFModelConfig


class OptimConfig(_Section):
    name: Literal["sgd", "adam", "adamw", "rmsprop", "adagrad"] = "adam"
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    momentum: float | None = Field(default=None, ge=0, lt=1)  # sgd, rmsprop (default 0)
    betas: Annotated[list[Annotated[float, Field(ge=0, lt=1)]], Field(min_length=2, max_length=2)] | None = None


class NoScheduler(_Section):
    name: Literal["none"] = "none"


class StepScheduler(_Section):
    """Multiply the learning rate by ``gamma`` every ``step_size`` epochs."""

    name: Literal["step"]
    step_size: int = Field(default=10, ge=1)
    gamma: float = Field(default=0.5, gt=0, le=1)


class CosineScheduler(_Section):
    """Cosine decay from the initial rate to ``eta_min`` over ``t_max`` epochs (default: all)."""

    name: Literal["cosine"]
    t_max: PosInt | None = None
    eta_min: float = Field(default=0.0, ge=0)


class TrainConfig(_Section):
    """The training loop (see ``adaptnet.train.Trainer`` for each option)."""

    epochs: int = Field(default=20, ge=1)
    checkpoint_every: int = Field(default=1, ge=0)  # 0: only at the end and on a stop
    keep_last: PosInt | None = 3
    on_nonfinite: Literal["rollback", "stop"] = "rollback"
    lr_backoff: float = Field(default=0.5, gt=0, lt=1)
    max_rollbacks: int = Field(default=3, ge=0)
    grad_clip: float | None = Field(default=None, gt=0)
    probe_size: int = Field(default=256, ge=1)
    compile: bool = False
    tensorboard: bool = False


class Config(_Section):
    """A whole run. Build it with ``load_config`` or ``Config.from_dict``."""

    seed: int = Field(default=0, ge=0)
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    # Model defaults are copied by pydantic for every instance.
    data: DataConfig = DataConfig()
    model: Annotated[ModelConfig, Field(discriminator="type")] = MLPConfig()
    optim: OptimConfig = OptimConfig()
    scheduler: Annotated[NoScheduler | StepScheduler | CosineScheduler, Field(discriminator="name")] = NoScheduler()
    train: TrainConfig = TrainConfig()
    policies: list[dict[str, Any]] = Field(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _shorthands(cls, data: Any) -> Any:
        """``model`` without ``type`` is an MLP (``target`` or ``hf`` say which other kind); ``scheduler:
        cosine`` means ``{name: cosine}``."""
        if isinstance(data, Mapping):
            data = dict(data)
            if isinstance(data.get("model"), Mapping) and "type" not in data["model"]:
                kind = next((k for k in ("target", "hf") if k in data["model"]), "mlp")
                data["model"] = {"type": kind, **data["model"]}
            if isinstance(data.get("scheduler"), str) or data.get("scheduler", 0) is None:
                data["scheduler"] = {"name": data["scheduler"] or "none"}
        return data

    @model_validator(mode="after")
    def _cross_checks(self) -> Config:
        if isinstance(self.model, TargetModelConfig) and not TARGET.fullmatch(self.model.target):
            raise _fail("model.target", f"must look like package.module:callable, got {self.model.target!r}")
        _check_data(self.data, self.model)
        _check_optim(self.optim)
        self.policies = [_check_policy(i, p) for i, p in enumerate(self.policies)]
        return self

    @classmethod
    def from_dict(cls, data: Any) -> Config:
        """Validate a plain mapping; raise ``ConfigError`` (one line) if it is not a valid config."""
        if not isinstance(data, Mapping):
            got = type(data).__name__
            raise ConfigError(f"config: must be a mapping of sections (seed, data, model, ...), got {got}")
        try:
            return cls.model_validate(data)
        except ValidationError as err:
            raise ConfigError(format_validation_error(err, cls)) from None

    def to_dict(self) -> dict[str, Any]:
        """The resolved config (every default filled in) as plain YAML-able values."""
        return self.model_dump(mode="json")


def _fail(key: str, message: str) -> PydanticCustomError:
    return PydanticCustomError(OWN_ERROR, "{text}", {"text": f"{key}: {message}"})


def _check_data(data: DataConfig, model: ModelConfig) -> None:
    if data.name is None and data.csv is None:
        raise _fail("data.name", f"required unless data.csv is set; must be one of {', '.join(DATASETS)}, tokens")
    if data.name is not None and data.csv is not None:
        raise _fail("data.csv", f"set either data.name or data.csv, not both (data.name is {data.name})")
    if data.csv is not None and not data.target:
        raise _fail("data.target", "required with data.csv; must be the name of the target column")
    if data.csv is None and data.target is not None:
        raise _fail("data.target", "only valid with data.csv")
    if data.samples is not None and data.name not in ("synthetic", "regression", "tokens"):
        raise _fail("data.samples", "only valid with data.name: synthetic, regression or tokens")
    _check_hf_data(data, model)
    if data.val_fraction + data.test_fraction > 0.9:
        raise _fail("data.test_fraction", "val_fraction + test_fraction must be <= 0.9 (training needs data), "
                    f"got {data.val_fraction} + {data.test_fraction}")
    if data.csv is not None:
        path = Path(data.csv).expanduser().resolve()  # absolute, so that `adaptnet resume` finds it anywhere
        if not path.is_file():
            raise _fail("data.csv", f"file not found: {path}")
        data.csv = str(path)
    if model.type == "cnn" and data.name not in IMAGE_DATASETS:
        got = f"data.name: {data.name}" if data.name else "data.csv"
        raise _fail("model.type", f"cnn needs image data (data.name: {', '.join(IMAGE_DATASETS)}), got {got}")


def _check_hf_data(data: DataConfig, model: ModelConfig) -> None:
    """Token models need token ids: generated ``tokens`` (causal LM), or digits' whole-number pixels."""
    causal = isinstance(model, HFModelConfig) and model.task == "causal_lm"
    if data.name == "tokens" and not (causal or isinstance(model, TargetModelConfig)):
        raise _fail("data.name", "tokens is for model.hf with task causal_lm (or a model.target), "
                    f"got model.type {model.type}")
    if causal and data.name != "tokens":
        raise _fail("data.name", f"model.hf with task causal_lm trains on data.name: tokens, got {data.name or 'csv'}")
    if isinstance(model, HFModelConfig) and model.task == "sequence_classification" and (
            data.name != "digits" or data.standardize):
        raise _fail("data.name", "model.hf with task sequence_classification reads token ids: use data.name: digits "
                    "with data.standardize: false (pixels 0-16 as tokens)")


def _check_optim(optim: OptimConfig) -> None:
    if optim.momentum is not None and optim.name not in ("sgd", "rmsprop"):
        raise _fail("optim.momentum", f"only valid with optim.name sgd or rmsprop, got {optim.name}")
    if optim.betas is not None and optim.name not in ("adam", "adamw"):
        raise _fail("optim.betas", f"only valid with optim.name adam or adamw, got {optim.name}")


@functools.cache
def _policy_schema(name: str) -> type[BaseModel]:
    """A strict pydantic model of a policy's constructor (types and defaults from its signature)."""
    cls: Any = POLICIES[name]
    hints = typing.get_type_hints(cls.__init__)
    fields: dict[str, Any] = {"name": (Literal[name], ...)}
    for param in list(inspect.signature(cls.__init__).parameters.values())[1:]:
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        default = ... if param.default is param.empty else param.default
        fields[param.name] = (hints.get(param.name, Any), default)
    return create_model(f"{cls.__name__}Options", __config__=ConfigDict(extra="forbid", strict=True), **fields)


def _check_policy(index: int, entry: Mapping[str, Any]) -> dict[str, Any]:
    """Validate one ``{name: ..., <options>}`` entry by building the policy; return it with defaults."""
    key = f"policies.{index}"
    name = entry.get("name")
    # The type first: a mapping or a list as the name cannot even be looked up (unhashable).
    if not isinstance(name, str) or name not in POLICIES:
        got = f"got {show_value(name)}" if "name" in entry else "got nothing"
        raise _fail(f"{key}.name", f"must be one of {', '.join(sorted(POLICIES))}, {got}")
    schema = _policy_schema(name)
    try:
        options = schema.model_validate(dict(entry)).model_dump()
    except ValidationError as err:
        text = format_validation_error(err, schema, prefix=key)
        raise PydanticCustomError(OWN_ERROR, "{text}", {"text": text}) from None
    options_only = {k: v for k, v in options.items() if k != "name"}
    try:
        make_policy(name, options_only)
    except (TypeError, ValueError) as err:
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        match = re.match(r"(\w+) (must .*)", message)
        if match and match.group(1) in options_only:
            raise _fail(f"{key}.{match.group(1)}", match.group(2)) from None
        raise _fail(key, f"invalid options for {name}: {message}") from None
    return options


# -- loading ----------------------------------------------------------------------------------
class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-3`` as a float (YAML 1.1 wants ``1.0e-3``)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def parse_value(text: str) -> Any:
    """An override's value as a YAML scalar or flow collection (``50``, ``[32,16]``, ``null``)."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError:
        return text  # not YAML: keep it as a string and let validation judge it


def apply_override(data: dict[str, Any], override: str) -> None:
    """Apply ``a.b.c=value`` to ``data`` in place (list items by index: ``policies.0.by=4``)."""
    key, sep, text = override.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {override!r}: expected KEY=VALUE, such as train.epochs=50")
    parts = key.strip().split(".")
    node: Any = data
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        where = ".".join(parts[:depth]) or "config"
        value = parse_value(text) if last else None
        if isinstance(node, list):
            if not part.isdigit() or int(part) > len(node):
                raise ConfigError(f"override {override!r}: {where} is a list of {len(node)}; "
                                  f"use an index from 0 to {len(node)}")
            if int(part) == len(node):
                node.append({})  # one past the end appends an entry (policies.1.name=...)
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                if node.get(part) is None:
                    node[part] = [] if part == "policies" else {}
                node = node[part]
        else:
            raise ConfigError(f"override {override!r}: {where} is {node!r}, not a mapping or list")


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file as a mapping (``ConfigError`` for a missing or malformed file)."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"config file not found: {file}")
    try:
        data = yaml.load(file.read_text(encoding="utf-8"), Loader=_Loader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{file}: invalid YAML{where}: {problem}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{file}: cannot read it ({err})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{file}: must be a mapping of sections (seed, data, model, ...), got {type(data).__name__}")
    return data


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> Config:
    """Load a YAML config (or start from defaults with ``path=None``) and apply overrides.

    Args:
        path: the YAML file.
        overrides: ``KEY=VALUE`` strings with dotted keys, values parsed as YAML
            (``train.epochs=50``, ``model.hidden=[32,16]``, ``policies.0.by=4``).

    Raises:
        ConfigError: one line naming the key at fault and what is allowed.
    """
    data = read_yaml(path) if path is not None else {}
    for override in overrides:
        apply_override(data, override)
    return Config.from_dict(data)
