"""One typed configuration for training, experiments and the notebooks.

A :class:`Config` has three sections -- ``data``, ``model`` and ``trainer`` -- each a dataclass with
the paper's protocol as defaults (Adam, lr 1e-4, L1 loss on standardised targets, batch 128,
early stopping on the validation loss with patience 10, 80/10/10 random split).

>>> cfg = Config.from_dict({"data": {"dataset": "qm7b", "targets": ["HOMO (PBE0)"]},
...                         "model": {"readout": "abp", "backbone_hparams": {"hidden_channels": 64}}})
>>> cfg = cfg.with_overrides(["trainer.max_epochs=3", "model.readout_hparams.heads=4"])
>>> cfg.save("cfg.yaml"); Config.load("cfg.yaml") == cfg
True

Everything is validated when the config is built, before any data is loaded or any training starts,
and every error is a :class:`ConfigError` (a ``ValueError``) whose message starts with the dotted
name of the offending field, e.g. ``trainer.lr must be a float, got 'abc'``. The only checks that
need the dataset (a target index out of range, an unknown target name) run when the data module is
set up, still before the first training step, and name ``data.targets[i]``.

Strings from a command line (``key=value``) are parsed as YAML scalars/lists (``3`` -> int,
``1.0e-4`` -> float, ``[a, b]`` -> list, ``null`` -> None). Float fields also accept numeric strings
such as ``"1e-4"`` (YAML 1.1, and therefore PyYAML, reads ``1e-4`` without a dot as a string).
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import inspect
import json
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from .coercion import Rules, coerce
from .files import write_text

__all__ = [
    "ConfigError",
    "DataConfig",
    "ModelConfig",
    "TrainerConfig",
    "Config",
    "load_config",
    "parse_override",
    "DATASETS",
    "PRECISIONS",
    "STRATEGIES",
]


class ConfigError(ValueError):
    """An invalid configuration value; the message starts with the field's dotted name."""


#: Dataset names accepted by :func:`abp_core.data.get_dataset`.
DATASETS = ("qm9", "qm7b", "qm8", "md17", "oe62", "qmugs")
#: Lightning precision strings (aliases such as ``32``, ``"bf16"`` and ``16`` are normalised to these).
PRECISIONS = ("32-true", "64-true", "16-mixed", "bf16-mixed", "16-true", "bf16-true")
_PRECISION_ALIASES = {"32": "32-true", "64": "64-true", "16": "16-mixed", "bf16": "bf16-mixed",
                      "double": "64-true", "float": "32-true", "half": "16-mixed"}
#: Lightning strategies this package supports.
STRATEGIES = ("auto", "single_device", "ddp", "ddp_spawn", "ddp_notebook", "ddp_find_unused_parameters_true")
LOSSES = ("l1", "mse")
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULERS = (None, "plateau")
SPLITS = ("random", "paper")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")


# ------------------------------------------------------------------------------------------------
# Sections
# ------------------------------------------------------------------------------------------------
@dataclass
class DataConfig:
    """What to train on.

    Attributes:
        dataset: one of :data:`DATASETS`.
        targets: target(s) by name (as in ``dataset.target_names``, case-insensitive) or column
            index; a single value is accepted and becomes a one-element list.
        split: ``"random"`` (seeded 80/10/10 by default) or ``"paper"`` (the paper's published split
            for the given seed: QM7b seeds 23887, 386333, 514094, 572909, 598587; OE62 0-4).
        split_seed: seed of the random split (or which paper split).
        split_fractions: train/val/test fractions of a random split (must sum to 1).
        subset: use only this many molecules: a fixed random subset (the same for every split seed),
            then split; with ``split="paper"`` each part of the paper's split is cut to its share by a
            permutation seeded with ``split_seed``. ``None`` = all.
        root: data root (default: ``$ABP_DATA_DIR``, else the user cache).
        dataset_kwargs: extra keyword arguments for the loader (e.g. ``{"molecule": "aspirin"}``).
        orbital_labels: path of saved :class:`abp_core.orbitals.OrbitalLabels` attached as
            ``homo_coeff`` (needed by the ``owa`` readout unless the dataset carries them).
    """

    dataset: str = "qm7b"
    targets: List[Union[str, int]] = field(default_factory=lambda: [0])
    split: str = "random"
    split_seed: int = 0
    split_fractions: List[float] = field(default_factory=lambda: [0.8, 0.1, 0.1])
    subset: Optional[int] = None
    root: Optional[str] = None
    dataset_kwargs: Dict[str, Any] = field(default_factory=dict)
    orbital_labels: Optional[str] = None


@dataclass
class ModelConfig:
    """Which model to build (:func:`abp_core.models.build_model`).

    Attributes:
        backbone: ``"schnet"`` or ``"dimenet++"``.
        readout: ``"sum"``, ``"mean"``, ``"max"``, ``"wa"``, ``"owa"`` or ``"abp"``.
        backbone_hparams: backbone options (defaults: the paper's sizes), e.g.
            ``{"hidden_channels": 64, "num_interactions": 3}``.
        readout_hparams: readout options, e.g. ``{"heads": 4, "num_seeds": 1}`` for ABP or
            ``{"beta": 10}`` for OWA. May also be keyed by readout name
            (``{"abp": {"heads": 4}, "owa": {"beta": 10}}``) so that one config serves an
            experiment over several readouts; only the chosen readout's entry is used.
    """

    backbone: str = "schnet"
    readout: str = "abp"
    backbone_hparams: Dict[str, Any] = field(default_factory=dict)
    readout_hparams: Dict[str, Any] = field(default_factory=dict)

    def readout_kwargs(self) -> Dict[str, Any]:
        """The options of the chosen readout (resolving the per-readout form)."""
        return _readout_kwargs(self.readout_hparams, self.readout)


@dataclass
class TrainerConfig:
    """How to train (Lightning ``Trainer`` options and the optimisation protocol).

    Attributes:
        lr: learning rate (paper: 1e-4).
        optimizer: ``"adam"`` (paper), ``"adamw"`` or ``"sgd"``.
        weight_decay: weight decay of the optimizer.
        loss: ``"l1"`` (paper) or ``"mse"``, on standardised targets.
        batch_size: training batch size per process (paper: 128). With DDP the global batch is
            ``batch_size * world_size``.
        eval_batch_size: batch size for validation/test (default: ``batch_size``).
        max_epochs: upper bound on epochs (early stopping usually ends training first).
        max_steps: upper bound on optimisation steps (``-1`` = none).
        patience: early-stopping patience in epochs on the validation loss (``None`` disables).
        min_delta: minimum decrease of the validation loss that counts as improvement.
        scheduler: ``None`` or ``"plateau"`` (ReduceLROnPlateau on the validation loss).
        scheduler_factor / scheduler_patience / min_lr: ReduceLROnPlateau options.
        gradient_clip: clip the gradient norm to this value (``None`` = no clipping).
        precision: Lightning precision, e.g. ``"32-true"`` or ``"bf16-mixed"``.
        accelerator / devices / strategy: Lightning device options (``"auto"`` picks a GPU if present;
            ``strategy="ddp"`` with ``devices=2`` runs two processes, gloo on CPU).
        num_workers: DataLoader worker processes (0 = load in the main process).
        pin_memory: pin host memory (default: only when training on a GPU).
        seed: seed of initialisation and shuffling (default: ``data.split_seed``).
        deterministic: ask torch for deterministic algorithms.
        checkpoint_every_n_steps: also write ``last.ckpt`` every N optimisation steps (mid-epoch).
        output_dir: root of the run directories.
        progress_bar: show Lightning's progress bar.
        flush_denormals: flush sub-normal floats (below 1.2e-38) to zero during training, on all CPU threads
            (x86 FTZ/DAZ, :func:`abp_core.kernels.flush_denormals`): on x86 each sub-normal costs a microcode
            assist, and SchNet's backward meets them. ``None`` (default): on when training on the CPU, off on a
            GPU (which handles them at full speed). Changes results only below float32's rounding, so, like
            the device, it is not part of the run's fingerprint.
        keep_freed_memory: keep memory freed during training in the process for reuse, instead of returning
            it to the system (glibc's ``mallopt``, :func:`abp_core.allocator.freed_memory_kept`; nothing
            changes with another C library): otherwise every step's large tensors touch fresh pages, one page
            fault each (tens of thousands per paper-size SchNet step). The process holds more memory (a 13-18 %
            higher peak in ``benchmarks/epoch.py``) until training ends. ``None`` (default): on when training on
            the CPU. Results do not change; not part of the run's fingerprint.
    """

    lr: float = 1e-4
    optimizer: str = "adam"
    weight_decay: float = 0.0
    loss: str = "l1"
    batch_size: int = 128
    eval_batch_size: Optional[int] = None
    max_epochs: int = 1000
    max_steps: int = -1
    patience: Optional[int] = 10
    min_delta: float = 0.0
    scheduler: Optional[str] = None
    scheduler_factor: float = 0.5
    scheduler_patience: int = 5
    min_lr: float = 1e-6
    gradient_clip: Optional[float] = None
    precision: str = "32-true"
    accelerator: str = "auto"
    devices: Union[int, str, List[int]] = "auto"
    strategy: str = "auto"
    num_workers: int = 0
    pin_memory: Optional[bool] = None
    seed: Optional[int] = None
    deterministic: bool = False
    checkpoint_every_n_steps: Optional[int] = None
    output_dir: str = "runs"
    progress_bar: bool = True
    flush_denormals: Optional[bool] = None
    keep_freed_memory: Optional[bool] = None


_SECTIONS = {"data": DataConfig, "model": ModelConfig, "trainer": TrainerConfig}
#: Fields that do not change the result of a run (left out of :meth:`Config.fingerprint`).
_NOT_IN_FINGERPRINT = {
    "data": {"root"},
    "trainer": {"output_dir", "num_workers", "pin_memory", "progress_bar", "checkpoint_every_n_steps",
                "accelerator", "devices", "strategy", "flush_denormals", "keep_freed_memory"},
}


# ------------------------------------------------------------------------------------------------
# Type checking / coercion
# ------------------------------------------------------------------------------------------------
#: Config values come from YAML/JSON, already typed: only lossless conversions (see :mod:`abp_core.coercion`).
_RULES = Rules(ConfigError)


def _coerce(value: Any, hint, name: str) -> Any:
    """``value`` converted to ``hint`` (strictly), or :class:`ConfigError` naming ``name``."""
    return coerce(value, hint, name, _RULES)


def _suggest(key: str, options) -> str:
    close = difflib.get_close_matches(key, list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _build_section(cls, values: Any, prefix: str):
    if values is None:
        values = {}
    if dataclasses.is_dataclass(values) and isinstance(values, cls):
        values = dataclasses.asdict(values)
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix} must be a mapping of options, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in values if k not in names]
    if unknown:
        k = unknown[0]
        raise ConfigError(f"{prefix}.{k}: unknown option{_suggest(str(k), names)}; "
                          f"valid options: {', '.join(names)}")
    kwargs = {}
    for k, v in values.items():
        if k == "targets" and cls is DataConfig and isinstance(v, (str, int)) and not isinstance(v, bool):
            v = [v]
        if k == "precision" and cls is TrainerConfig and isinstance(v, (int, str)) and not isinstance(v, bool):
            v = _PRECISION_ALIASES.get(str(v), str(v))
        kwargs[k] = _coerce(v, hints[k], f"{prefix}.{k}")
    return cls(**kwargs)


# ------------------------------------------------------------------------------------------------
# Model option checks (against the constructors' signatures)
# ------------------------------------------------------------------------------------------------
def _readout_kwargs(hparams: Dict[str, Any], readout: str) -> Dict[str, Any]:
    from .readouts import READOUTS

    if hparams and all(k in READOUTS for k in hparams) and all(isinstance(v, dict) or v is None
                                                             for v in hparams.values()):
        return dict(hparams.get(readout) or {})
    return dict(hparams)


def _check_options(cls, options: Dict[str, Any], prefix: str, exclude=("self", "in_channels")) -> Dict[str, Any]:
    """Check option names/types against ``cls.__init__``'s signature (types from the defaults)."""
    sig = inspect.signature(cls.__init__)
    params = {n: p for n, p in sig.parameters.items()
              if n not in exclude and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    out = {}
    for key, value in options.items():
        if key not in params:
            raise ConfigError(f"{prefix}.{key}: unknown option for {cls.__name__}{_suggest(key, params)}; "
                              f"valid options: {', '.join(params) or '(none)'}")
        default = params[key].default
        name = f"{prefix}.{key}"
        if isinstance(default, bool):
            value = _coerce(value, bool, name)
        elif isinstance(default, int):
            value = _coerce(value, int, name)
        elif isinstance(default, float):
            value = _coerce(value, float, name)
        elif isinstance(default, str):
            value = _coerce(value, str, name)
        elif default is None and value is not None:
            # Optional[int] widths/sizes; keep the value but reject obvious type errors
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"{name} must be an integer or null, got {value!r}")
            value = _coerce(value, int, name)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
            raise ConfigError(f"{name} must be non-negative, got {value!r}")
        out[key] = value
    return out


def _signature_default(cls, key: str):
    return inspect.signature(cls.__init__).parameters[key].default


def _validate_model(model: ModelConfig) -> None:
    from .models import BACKBONES
    from .readouts import READOUTS, AttentionPooling

    backbone = model.backbone.lower()
    if backbone not in BACKBONES:
        raise ConfigError(f"model.backbone: unknown backbone {model.backbone!r}{_suggest(backbone, BACKBONES)}; "
                          f"choose one of {sorted(BACKBONES)}")
    readout = model.readout.lower()
    if readout not in READOUTS:
        raise ConfigError(f"model.readout: unknown readout {model.readout!r}{_suggest(readout, READOUTS)}; "
                          f"choose one of {sorted(READOUTS)}")
    model.backbone, model.readout = backbone, readout
    bcls = BACKBONES[backbone]
    bh = _check_options(bcls, model.backbone_hparams, "model.backbone_hparams")
    for key in ("hidden_channels", "num_filters", "num_interactions", "num_blocks", "num_gaussians",
                "int_emb_size", "basis_emb_size", "out_emb_channels", "num_spherical", "num_radial"):
        if key in bh and bh[key] is not None and bh[key] < 1:
            raise ConfigError(f"model.backbone_hparams.{key} must be >= 1, got {bh[key]}")
    if "cutoff" in bh and not bh["cutoff"] > 0:
        raise ConfigError(f"model.backbone_hparams.cutoff must be > 0, got {bh['cutoff']}")
    model.backbone_hparams = bh

    # Width of the per-atom features the readout sees.
    width = bh.get("hidden_channels", _signature_default(bcls, "hidden_channels"))
    width_field = "model.backbone_hparams.hidden_channels"
    if backbone == "dimenet++" and bh.get("out_channels"):
        width, width_field = bh["out_channels"], "model.backbone_hparams.out_channels"

    per_readout = bool(model.readout_hparams) and all(k in READOUTS for k in model.readout_hparams)
    if per_readout:  # one entry per readout (experiment grids): every entry is checked, not only the chosen one
        checked = {}
        for name, opts in model.readout_hparams.items():
            if opts is not None and not isinstance(opts, dict):
                raise ConfigError(f"model.readout_hparams.{name} must be a mapping, got {opts!r}")
            checked[name] = _validate_readout(name, opts or {}, f"model.readout_hparams.{name}", width, width_field)
        model.readout_hparams = checked
    else:
        model.readout_hparams = _validate_readout(readout, model.readout_hparams, "model.readout_hparams",
                                                  width, width_field)


def _validate_readout(readout: str, options: Dict[str, Any], prefix: str, width: int, width_field: str):
    from .readouts import READOUTS, AttentionPooling, build_readout

    rcls = READOUTS[readout]
    rh = _check_options(rcls, options, prefix)
    if issubclass(rcls, AttentionPooling):
        heads = rh.get("heads", _signature_default(rcls, "heads"))
        hidden = rh.get("hidden_channels") or width
        hidden_field = f"{prefix}.hidden_channels" if rh.get("hidden_channels") else width_field
        if heads < 1:
            raise ConfigError(f"{prefix}.heads must be >= 1, got {heads}")
        if hidden % heads != 0:
            raise ConfigError(f"{prefix}.heads ({heads}) must divide the attention width {hidden} "
                              f"({hidden_field})")
        if rh.get("num_seeds", 1) < 1:
            raise ConfigError(f"{prefix}.num_seeds must be >= 1, got {rh['num_seeds']}")
        dropout = rh.get("dropout", 0.0)
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"{prefix}.dropout must lie in [0, 1), got {dropout}")
    # Anything else the readout's constructor rejects (cheap: the readout alone is small).
    try:
        build_readout(readout, width, **rh)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{prefix}: {exc}") from None
    return rh


# ------------------------------------------------------------------------------------------------
# The config
# ------------------------------------------------------------------------------------------------
@dataclass
class Config:
    """The full configuration: ``data``, ``model`` and ``trainer`` sections (validated on creation)."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)

    def __post_init__(self):
        for name, cls in _SECTIONS.items():
            value = getattr(self, name)
            if not isinstance(value, cls):
                setattr(self, name, _build_section(cls, value, name))
        self.validate()

    # ---- construction ----------------------------------------------------------------------
    @classmethod
    def from_dict(cls, values: Optional[Dict[str, Any]] = None, overrides: Sequence[str] = ()) -> "Config":
        """Build from a nested mapping; keys with dots (``"model.readout": "abp"``) are overrides.

        Raises :class:`ConfigError` naming the field on any unknown key, wrong type or bad value.
        """
        values = copy.deepcopy(dict(values or {}))
        if not isinstance(values, dict):
            raise ConfigError(f"config must be a mapping, got {values!r}")
        dotted = {k: values.pop(k) for k in list(values) if isinstance(k, str) and "." in k}
        unknown = [k for k in values if k not in _SECTIONS]
        if unknown:
            k = unknown[0]
            raise ConfigError(f"{k}: unknown config section{_suggest(str(k), _SECTIONS)}; "
                              f"valid sections: {', '.join(_SECTIONS)}")
        for key, value in dotted.items():
            _set_dotted(values, key, value)
        for key, value in (parse_override(o) for o in overrides):
            _set_dotted(values, key, value)
        return cls(**{name: _build_section(scls, values.get(name), name) for name, scls in _SECTIONS.items()})

    @classmethod
    def load(cls, path: Union[str, os.PathLike], overrides: Sequence[str] = ()) -> "Config":
        """Read a YAML or JSON file (by suffix; YAML otherwise) and apply ``key=value`` overrides."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} not found")
        text = path.read_text()
        try:
            if path.suffix.lower() == ".json":
                values = json.loads(text)
            else:
                import yaml

                values = yaml.safe_load(text)
        except Exception as exc:  # noqa: BLE001 - any parse error becomes a ConfigError
            raise ConfigError(f"config file {str(path)!r} could not be parsed: {exc}") from None
        if values is None:
            values = {}
        if not isinstance(values, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping, got {type(values).__name__}")
        return cls.from_dict(values, overrides)

    def with_overrides(self, overrides: Sequence[str] = (), **updates) -> "Config":
        """A new config with ``key=value`` strings and/or dotted keyword updates applied.

        >>> cfg.with_overrides(["trainer.lr=3e-4"], **{"model.readout": "sum"})
        """
        values = self.to_dict()
        for key, value in updates.items():
            _set_dotted(values, key, value)
        return Config.from_dict(values, overrides)

    # ---- output -----------------------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        return {name: dataclasses.asdict(getattr(self, name)) for name in _SECTIONS}

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: Union[str, os.PathLike]) -> Path:
        """Write YAML (or JSON for a ``.json`` suffix), atomically (:mod:`abp_core.files`)."""
        path = Path(path)
        text = json.dumps(self.to_dict(), indent=2) if path.suffix.lower() == ".json" else self.to_yaml()
        return write_text(path, text)

    def fingerprint(self) -> str:
        """Short hash of everything that changes a run's result (not paths, workers, devices)."""
        values = self.to_dict()
        for section, keys in _NOT_IN_FINGERPRINT.items():
            for k in keys:
                values[section].pop(k, None)
        values["model"]["readout_hparams"] = self.model.readout_kwargs()
        values["trainer"]["seed"] = self.seed
        blob = json.dumps(values, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:8]

    @property
    def seed(self) -> int:
        """The training seed: ``trainer.seed`` or, if unset, ``data.split_seed``."""
        return self.trainer.seed if self.trainer.seed is not None else self.data.split_seed

    # ---- validation -------------------------------------------------------------------------
    def validate(self) -> "Config":
        d, m, t = self.data, self.model, self.trainer
        ds = d.dataset.lower()
        if ds not in DATASETS:
            raise ConfigError(f"data.dataset: unknown dataset {d.dataset!r}{_suggest(ds, DATASETS)}; "
                              f"choose one of {list(DATASETS)}")
        d.dataset = ds
        if not d.targets:
            raise ConfigError("data.targets must name at least one target")
        for i, tgt in enumerate(d.targets):
            if isinstance(tgt, int) and tgt < 0:
                raise ConfigError(f"data.targets[{i}]: target index must be >= 0, got {tgt}")
            if isinstance(tgt, str) and not tgt.strip():
                raise ConfigError(f"data.targets[{i}]: empty target name")
        if len(set(map(str, d.targets))) != len(d.targets):
            raise ConfigError(f"data.targets: duplicate targets in {d.targets}")
        if d.split not in SPLITS:
            raise ConfigError(f"data.split must be one of {list(SPLITS)}, got {d.split!r}")
        if len(d.split_fractions) != 3 or any(f <= 0 for f in d.split_fractions) \
                or abs(sum(d.split_fractions) - 1.0) > 1e-6:
            raise ConfigError(f"data.split_fractions must be three positive fractions summing to 1, "
                              f"got {d.split_fractions}")
        if d.subset is not None and d.subset < 10:
            raise ConfigError(f"data.subset must be >= 10 molecules (or null for all), got {d.subset}")
        if d.orbital_labels is not None and not d.orbital_labels.strip():
            raise ConfigError("data.orbital_labels must be a path or null")

        _validate_model(m)

        def positive(name, value, strict=True):
            if value is not None and (value <= 0 if strict else value < 0):
                raise ConfigError(f"trainer.{name} must be {'> 0' if strict else '>= 0'}, got {value}")

        positive("lr", t.lr)
        if not math.isfinite(t.lr):
            raise ConfigError(f"trainer.lr must be finite, got {t.lr}")
        positive("weight_decay", t.weight_decay, strict=False)
        positive("batch_size", t.batch_size)
        positive("eval_batch_size", t.eval_batch_size)
        positive("max_epochs", t.max_epochs)
        if t.max_steps != -1 and t.max_steps < 1:
            raise ConfigError(f"trainer.max_steps must be -1 (no limit) or >= 1, got {t.max_steps}")
        positive("patience", t.patience)
        positive("min_delta", t.min_delta, strict=False)
        positive("gradient_clip", t.gradient_clip)
        positive("num_workers", t.num_workers, strict=False)
        positive("checkpoint_every_n_steps", t.checkpoint_every_n_steps)
        positive("scheduler_patience", t.scheduler_patience, strict=False)
        positive("min_lr", t.min_lr, strict=False)
        if not 0.0 < t.scheduler_factor < 1.0:
            raise ConfigError(f"trainer.scheduler_factor must lie in (0, 1), got {t.scheduler_factor}")
        t.loss = t.loss.lower()
        if t.loss not in LOSSES:
            raise ConfigError(f"trainer.loss must be one of {list(LOSSES)}, got {t.loss!r}")
        t.optimizer = t.optimizer.lower()
        if t.optimizer not in OPTIMIZERS:
            raise ConfigError(f"trainer.optimizer must be one of {list(OPTIMIZERS)}, got {t.optimizer!r}")
        if t.scheduler is not None:
            t.scheduler = t.scheduler.lower()
            if t.scheduler in ("none", ""):
                t.scheduler = None
        if t.scheduler not in SCHEDULERS:
            raise ConfigError(f"trainer.scheduler must be null or 'plateau', got {t.scheduler!r}")
        if t.precision not in PRECISIONS:
            raise ConfigError(f"trainer.precision must be one of {list(PRECISIONS)}, got {t.precision!r}")
        if t.accelerator not in ACCELERATORS:
            raise ConfigError(f"trainer.accelerator must be one of {list(ACCELERATORS)}, got {t.accelerator!r}")
        if t.strategy not in STRATEGIES:
            raise ConfigError(f"trainer.strategy must be one of {list(STRATEGIES)}, got {t.strategy!r}")
        if isinstance(t.devices, str) and t.devices != "auto":
            try:
                t.devices = int(t.devices)
            except ValueError:
                raise ConfigError(f"trainer.devices must be 'auto', a positive integer or a list of device ids, "
                                  f"got {t.devices!r}") from None
        if isinstance(t.devices, int) and t.devices < 1 and t.devices != -1:
            raise ConfigError(f"trainer.devices must be >= 1 (or -1 for all), got {t.devices}")
        if t.seed is not None and t.seed < 0:
            raise ConfigError(f"trainer.seed must be >= 0, got {t.seed}")
        if not t.output_dir.strip():
            raise ConfigError("trainer.output_dir must be a non-empty path")
        return self


def _set_dotted(values: Dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    if len(parts) < 2 or not all(parts):
        raise ConfigError(f"{key}: overrides must look like section.option=value (e.g. trainer.lr=1e-3)")
    section = parts[0]
    if section not in _SECTIONS:
        raise ConfigError(f"{key}: unknown config section {section!r}{_suggest(section, _SECTIONS)}; "
                          f"valid sections: {', '.join(_SECTIONS)}")
    names = [f.name for f in dataclasses.fields(_SECTIONS[section])]
    if parts[1] not in names:
        raise ConfigError(f"{key}: unknown option{_suggest(parts[1], names)}; valid options for "
                          f"{section}: {', '.join(names)}")
    if len(parts) > 2 and parts[1] not in ("backbone_hparams", "readout_hparams", "dataset_kwargs"):
        raise ConfigError(f"{key}: {section}.{parts[1]} has no sub-options")
    node = values.setdefault(section, {})
    if node is None:
        node = values[section] = {}
    for p in parts[1:-1]:
        child = node.get(p)
        if not isinstance(child, dict):
            child = node[p] = {}
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> Tuple[str, Any]:
    """``"trainer.lr=1e-3"`` -> ``("trainer.lr", 0.001)`` (values parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"{text!r}: overrides must look like section.option=value (e.g. trainer.max_epochs=3)")
    key, raw = text.split("=", 1)
    key = key.strip()
    import yaml

    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string; the typed check handles floats
        value = value.strip()
    return key, value


def load_config(path: Optional[Union[str, os.PathLike]] = None, overrides: Sequence[str] = ()) -> Config:
    """A config from a file (or the defaults when ``path`` is None) plus ``key=value`` overrides."""
    if path is None:
        return Config.from_dict({}, overrides)
    return Config.load(path, overrides)
