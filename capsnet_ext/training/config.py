"""Training configuration: the ``TrainConfig`` dataclass, named presets and config files.

A preset is a plain dict of ``TrainConfig`` fields. ``load_config`` starts from the
dataclass defaults, applies the preset, then a JSON file, then keyword overrides (which is
what the command line passes), so every run is described by one flat, serialisable config
that checkpoints store and ``--resume`` restores.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import pathlib
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

PRECISIONS = ("fp32", "bf16")
DEVICE_DATA = ("auto", "on", "off")


def _mnist_capsnet(**overrides) -> Dict[str, Any]:
    model = dict(arch="capsnet", input_size=28, in_channels=1, num_classes=10,
                 conv_channels=256, primary_channels=32, primary_dim=8, digit_dim=16)
    model.update(overrides)
    return model


# Config fields a resumed run takes from the command line (or ``train(cfg, resume=...)`` from
# ``cfg``): how long it trains, how it evaluates, logs and checkpoints, where it runs and reads
# data, and which kernel backend runs the same weights. Everything else (model, data,
# optimiser, seed, precision) is the saved run's; ``capsnet-ext train --resume`` refuses other
# values rather than ignoring them.
RESUME_CHANGEABLE = ("out", "max_steps", "epochs", "device", "progress", "log_every",
                     "eval_every", "checkpoint_every", "num_workers", "data_dir", "tensorboard",
                     "backend", "device_data")


@dataclass
class TrainConfig:
    """Everything that defines a training run.

    ``model`` is the dict for :func:`capsnet_ext.nn.build_model` (``"arch"`` key);
    ``input_size``, ``in_channels`` and ``num_classes`` are filled in from the dataset when
    absent. ``iterations`` and ``backend`` (when not ``None``) override the model dict's
    entries, so the command line can change them for any preset. ``max_steps`` (when set)
    stops training at that optimizer step even before ``epochs`` are done. Step counters
    are optimizer steps over *global* batches of ``batch_size`` images (split across ranks
    under DDP).
    """

    dataset: str = "mnist"
    dataset_options: Dict[str, Any] = field(default_factory=dict)
    data_dir: Optional[str] = None
    model: Dict[str, Any] = field(default_factory=_mnist_capsnet)
    epochs: int = 1
    max_steps: Optional[int] = None
    batch_size: int = 128
    eval_batch_size: int = 256
    lr: float = 1e-3
    lr_decay: float = 0.96           # official code: x0.96 ...
    lr_decay_steps: int = 2000       # ... every 2000 steps (continuous, as tf exponential_decay)
    lr_staircase: bool = False
    lr_min: float = 1e-6
    weight_decay: float = 0.0
    recon_weight: float = 0.0005
    recon_target: str = "input"      # "input" | "components" (MultiMNIST: each digit apart)
    margin: Dict[str, float] = field(default_factory=lambda: dict(m_pos=0.9, m_neg=0.1, lam=0.5))
    max_shift: int = 2               # paper: random shifts of up to 2 px, zero padding
    crop_size: Optional[int] = None  # CIFAR recipe: random crops in training, centre crop in test
    backend: Optional[str] = None    # None: keep the model dict's backend ("auto" by default)
    iterations: Optional[int] = None
    seed: int = 0
    deterministic: bool = False      # torch.use_deterministic_algorithms (GPU runs)
    precision: str = "fp32"          # "fp32" | "bf16" (autocast)
    device: str = "auto"
    out: str = "runs/mnist"
    log_every: int = 50
    eval_every: Optional[int] = None  # steps; None: auto_eval_every (and always at the end)
    eval_limit: Optional[int] = None  # evaluate on the first N test items during training
    checkpoint_every: int = 1000
    num_workers: int = 0
    # Hold the training and test sets on the training device and take batches there by index
    # (the same batches as the host path, bit for bit): "on", "off", or "auto" (on the CPU, and
    # on a GPU for each set whose device copy fits in a quarter of the free memory; off with
    # num_workers > 0 or for data sets that cannot be moved, e.g. MultiMNIST's pairs).
    device_data: str = "auto"
    grad_flow_every: int = 0          # call on_after_backward every N steps (0: every step)
    # Record per-capsule gradient norms of every routing layer's W (GradientFlowRecorder) every
    # grad_flow_every steps into <out>/gradient_flow.npz; kept in checkpoints, so resumable.
    record_gradient_flow: bool = False
    # torchvision-style RandomAffine training augmentation: {"degrees", "shear", "scale": [lo, hi]}.
    random_affine: Optional[Dict[str, Any]] = None
    # Decay the learning rate by lr_decay once per epoch (ExponentialLR stepped every epoch)
    # instead of continuously every lr_decay_steps steps.
    lr_decay_per_epoch: bool = False
    tensorboard: bool = True
    progress: bool = True

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        _check_field_types(self)
        check_model_config(self.model)

        def positive_int(name, value, allow_none=False):
            if value is None and allow_none:
                return
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"config field {name!r} must be a positive int, got {value!r}")

        positive_int("epochs", self.epochs)
        positive_int("batch_size", self.batch_size)
        positive_int("eval_batch_size", self.eval_batch_size)
        positive_int("max_steps", self.max_steps, allow_none=True)
        positive_int("eval_every", self.eval_every, allow_none=True)
        positive_int("eval_limit", self.eval_limit, allow_none=True)
        positive_int("iterations", self.iterations, allow_none=True)
        positive_int("log_every", self.log_every)
        positive_int("checkpoint_every", self.checkpoint_every)
        positive_int("lr_decay_steps", self.lr_decay_steps)
        positive_int("crop_size", self.crop_size, allow_none=True)
        if not isinstance(self.max_shift, int) or self.max_shift < 0:
            raise ValueError(f"config field 'max_shift' must be an int >= 0, got {self.max_shift!r}")
        if self.device_data not in DEVICE_DATA:
            raise ValueError(f"config field 'device_data' must be one of {DEVICE_DATA}, "
                             f"got {self.device_data!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"config field 'precision' must be one of {PRECISIONS}, got {self.precision!r}")
        if self.recon_target not in ("input", "components"):
            raise ValueError("config field 'recon_target' must be 'input' or 'components', "
                             f"got {self.recon_target!r}")
        if not isinstance(self.model, dict) or "arch" not in self.model:
            raise ValueError(f"config field 'model' must be a dict with an 'arch' key, got {self.model!r}")
        if not (0 < self.lr_decay <= 1):
            raise ValueError(f"config field 'lr_decay' must be in (0, 1], got {self.lr_decay!r}")
        if self.random_affine is not None:
            keys = {"degrees", "shear", "scale"}
            if not isinstance(self.random_affine, dict) or set(self.random_affine) != keys:
                raise ValueError(f"config field 'random_affine' must be None or a dict with exactly the keys "
                                 f"{sorted(keys)}, got {self.random_affine!r}")
            scale = self.random_affine["scale"]
            if not (isinstance(scale, (list, tuple)) and len(scale) == 2 and 0 < scale[0] <= scale[1]):
                raise ValueError(f"config field 'random_affine.scale' must be [low, high] with "
                                 f"0 < low <= high, got {scale!r}")
            for key in ("degrees", "shear"):
                value = self.random_affine[key]
                if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                    raise ValueError(f"config field 'random_affine.{key}' must be a number >= 0, got {value!r}")
        unknown = set(self.margin) - {"m_pos", "m_neg", "lam"}
        if unknown:
            raise ValueError(f"config field 'margin' takes m_pos, m_neg, lam; got unknown {sorted(unknown)}")

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def model_config(self) -> Dict[str, Any]:
        """The model dict with the ``iterations``/``backend`` overrides applied (for
        capsule models, which take those arguments)."""
        model = copy.deepcopy(self.model)
        if model.get("arch") != "baseline-cnn":
            if self.iterations is not None:
                model["iterations"] = self.iterations
            if self.backend is not None:
                model["backend"] = self.backend
        return model


def _type_name(annotation) -> str:
    return {int: "an int", float: "a number", str: "a string", bool: "true or false",
            dict: "a JSON object"}.get(annotation, str(annotation))


def _matches(value, annotation) -> Optional[bool]:
    """Whether ``value`` fits the field annotation (``None``: an annotation not checked here)."""
    origin = typing.get_origin(annotation)
    if origin is typing.Union:
        results = [_matches(value, arg) for arg in typing.get_args(annotation)]
        if any(r is True for r in results):
            return True
        return None if any(r is None for r in results) else False
    if annotation is type(None):
        return value is None
    if annotation is Any:
        return True
    if origin in (dict, Dict):
        return isinstance(value, dict)
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    return None


def _check_field_types(cfg: "TrainConfig") -> None:
    """Every field's value against its annotation: ``--set lr=abc`` fails here, naming the
    field and what it takes, not later inside the optimizer."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        annotation = hints.get(f.name)
        if annotation is None or _matches(value, annotation) is not False:
            continue
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        base = args[0] if typing.get_origin(annotation) is typing.Union and len(args) == 1 else annotation
        expected = _type_name(typing.get_origin(base) or base)
        if base is not annotation:
            expected += " or null"
        raise ValueError(f"config field {f.name!r} must be {expected}, got {value!r}")


def model_arguments(arch: str) -> Optional[list]:
    """Names the model builder of ``arch`` accepts (``None`` when it takes any keyword)."""
    import inspect

    from ..nn import MODEL_REGISTRY

    if arch not in MODEL_REGISTRY:
        raise ValueError(f"config field 'model': unknown arch {arch!r}; expected one of "
                         f"{sorted(MODEL_REGISTRY)}")
    try:
        parameters = inspect.signature(MODEL_REGISTRY[arch]).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind == p.VAR_KEYWORD for p in parameters):
        return None
    return sorted(p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
                  and p.name != "self")


def check_model_config(model) -> None:
    """The ``model`` dict's keys against its builder's arguments (``--set model.conv_chanels=1``
    fails here, listing the valid names)."""
    if not isinstance(model, dict) or "arch" not in model:
        raise ValueError(f"config field 'model' must be a dict with an 'arch' key, got {model!r}")
    accepted = model_arguments(model["arch"])
    if accepted is None:
        return
    unknown = sorted(set(model) - set(accepted) - {"arch"})
    if unknown:
        raise ValueError(f"config field 'model': arch {model['arch']!r} takes no argument(s) "
                         f"{unknown}; valid names: {', '.join(accepted)}")
    from ..nn import MODEL_REGISTRY

    builder = MODEL_REGISTRY[model["arch"]]
    try:
        hints = typing.get_type_hints(builder.__init__ if isinstance(builder, type) else builder)
    except Exception:  # annotations that do not resolve are simply not checked
        hints = {}
    for key, value in model.items():
        annotation = hints.get(key)
        if annotation is not None and _matches(value, annotation) is False:
            raise ValueError(f"config field 'model.{key}' must be "
                             f"{_type_name(typing.get_origin(annotation) or annotation)}, got {value!r}")


def _preset(**fields) -> Dict[str, Any]:
    return fields


_BASELINE = dict(arch="baseline-cnn", dropout=0.5)

# Paper recipes (Sabour et al. 2017 and the official code; see the project notes). Epoch
# counts are what a single GPU needs to approach the paper's numbers; shorten with
# --epochs / --max-steps.
PRESETS: Dict[str, Dict[str, Any]] = {
    "mnist": _preset(dataset="mnist", model=_mnist_capsnet(iterations=3), epochs=300,
                     max_shift=2, out="runs/mnist", eval_every=None, checkpoint_every=2000),
    "mnist-ablation": _preset(dataset="mnist", model=_mnist_capsnet(iterations=1), epochs=300,
                              max_shift=2, recon_weight=0.0, out="runs/mnist-ablation"),
    "multimnist": _preset(dataset="multimnist",
                          model=_mnist_capsnet(input_size=36, iterations=3), epochs=20,
                          max_shift=0, recon_target="components", out="runs/multimnist",
                          eval_limit=10000, eval_every=5000, checkpoint_every=5000),
    "affnist": _preset(dataset="affnist", model=_mnist_capsnet(input_size=40, iterations=3),
                       # MNIST centred on 40x40 and placed anywhere in the frame (+-6 px),
                       # as the paper trains for affNIST.
                       epochs=100, max_shift=6, out="runs/affnist"),
    "fashion-mnist": _preset(dataset="fashion-mnist", model=_mnist_capsnet(iterations=3),
                             epochs=100, max_shift=2, out="runs/fashion-mnist"),
    "cifar10": _preset(dataset="cifar10",
                       model=_mnist_capsnet(input_size=24, in_channels=3, primary_channels=64,
                                            leaky=True, iterations=3),
                       crop_size=24, max_shift=0, epochs=150, out="runs/cifar10"),
    "svhn": _preset(dataset="svhn",
                    model=_mnist_capsnet(input_size=32, in_channels=3, primary_channels=64,
                                         iterations=3),
                    max_shift=2, epochs=50, out="runs/svhn"),
    "smallnorb": _preset(dataset="smallnorb",
                         model=_mnist_capsnet(input_size=32, in_channels=1, num_classes=5,
                                              iterations=3),
                         crop_size=32, max_shift=0, epochs=100, out="runs/smallnorb"),
}
# The baseline CNN of the paper for each comparison: same data and augmentation,
# cross-entropy instead of margin + reconstruction losses.
for _name in ("mnist", "multimnist", "affnist", "fashion-mnist", "cifar10", "svhn", "smallnorb"):
    _base = copy.deepcopy(PRESETS[_name])
    _base["model"] = dict(_BASELINE)
    _base["recon_weight"] = 0.0
    _base["recon_target"] = "input"
    _base["out"] = f"runs/baseline-cnn-{_name}"
    PRESETS[f"baseline-cnn-{_name}"] = _base
PRESETS["baseline-cnn"] = copy.deepcopy(PRESETS["baseline-cnn-mnist"])
PRESETS["baseline-cnn"]["out"] = "runs/baseline-cnn"

# The paper's MNIST ablation table: (routing iterations, reconstruction) pairs.
ABLATION_TABLE = [(1, False), (1, True), (3, False), (3, True)]
for _iters, _recon in ABLATION_TABLE:
    _abl = copy.deepcopy(PRESETS["mnist"])
    _abl["model"]["iterations"] = _iters
    _abl["recon_weight"] = 0.0005 if _recon else 0.0
    _abl["out"] = f"runs/mnist-ablation-r{_iters}-{'recon' if _recon else 'norecon'}"
    PRESETS[f"mnist-ablation-r{_iters}-{'recon' if _recon else 'norecon'}"] = _abl


# One line per preset for ``capsnet-ext train --list-presets``.
PRESET_DESCRIPTIONS: Dict[str, str] = {
    "mnist": "CapsNet on MNIST, the paper's recipe (3 iterations, reconstruction, +-2 px shifts)",
    "mnist-ablation": "CapsNet on MNIST with 1 routing iteration and no reconstruction loss",
    "multimnist": "CapsNet on overlapping digit pairs (36x36), both digits reconstructed",
    "affnist": "CapsNet trained on MNIST in a 40x40 frame, tested on affine-transformed digits",
    "fashion-mnist": "CapsNet on Fashion-MNIST, the MNIST recipe",
    "cifar10": "CapsNet on CIFAR-10: 24x24 crops, 64 primary channels, none-of-the-above routing",
    "svhn": "CapsNet on SVHN digits (32x32 colour), 64 primary channels",
    "smallnorb": "CapsNet on smallNORB (5 toy classes), 32x32 crops",
    "baseline-cnn": "the paper's baseline CNN on MNIST (same data and augmentation, cross-entropy)",
}
for _name in ("mnist", "multimnist", "affnist", "fashion-mnist", "cifar10", "svhn", "smallnorb"):
    PRESET_DESCRIPTIONS[f"baseline-cnn-{_name}"] = (f"the paper's baseline CNN for the {_name} "
                                                   "comparison (same data, cross-entropy)")
for _iters, _recon in ABLATION_TABLE:
    PRESET_DESCRIPTIONS[f"mnist-ablation-r{_iters}-{'recon' if _recon else 'norecon'}"] = (
        f"MNIST ablation table: {_iters} routing iteration{'s' if _iters > 1 else ''}, "
        f"{'with' if _recon else 'without'} reconstruction loss")


def describe_preset(name: str) -> str:
    """One line saying what the preset trains: its entry in ``PRESET_DESCRIPTIONS``, or a
    line made from its fields for a preset that has none."""
    if name in PRESET_DESCRIPTIONS:
        return PRESET_DESCRIPTIONS[name]
    preset = PRESETS[name]
    model = preset.get("model", {})
    parts = [f"{model.get('arch', '?')} on {preset.get('dataset', '?')}"]
    if "iterations" in model:
        parts.append(f"{model['iterations']} routing iterations")
    if "epochs" in preset:
        parts.append(f"{preset['epochs']} epochs")
    return ", ".join(parts)


def _merge(base: Dict[str, Any], update: Dict[str, Any]) -> Dict[str, Any]:
    """Recursive dict update (nested dicts such as ``model`` merge key by key; a ``model``
    naming another ``arch`` replaces the old one)."""
    merged = copy.deepcopy(base)
    for key, value in update.items():
        same_arch = not (key == "model" and isinstance(value, dict) and "arch" in value
                         and isinstance(merged.get(key), dict)
                         and value["arch"] != merged[key].get("arch"))
        if isinstance(value, dict) and isinstance(merged.get(key), dict) and same_arch:
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def load_config(preset: Optional[str] = None, path: Optional[os.PathLike] = None,
                **overrides) -> TrainConfig:
    """Build a :class:`TrainConfig` from defaults <- ``preset`` <- JSON file ``path`` <-
    ``overrides``. Overrides whose value is ``None`` are ignored (unset command-line flags).

    A JSON file may itself name a preset with a ``"preset"`` key. Nested dicts (``model``,
    ``dataset_options``, ``margin``) are merged key by key.
    """
    fields: Dict[str, Any] = {}
    file_fields: Dict[str, Any] = {}
    if path is not None:
        path = pathlib.Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {str(path)!r} does not exist")
        try:
            file_fields = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"config file {str(path)!r} is not valid JSON: {exc}") from None
        if not isinstance(file_fields, dict):
            raise ValueError(f"config file {str(path)!r} must hold a JSON object")
        preset = file_fields.pop("preset", None) or preset
    if preset is not None:
        if preset not in PRESETS:
            from .._cli import unknown_name

            raise ValueError(unknown_name("preset", preset, PRESETS))
        fields = _merge(fields, PRESETS[preset])
    fields = _merge(fields, file_fields)
    fields = _merge(fields, {k: v for k, v in overrides.items() if v is not None})
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"unknown config fields {unknown}; known fields: {sorted(known)}")
    return TrainConfig(**fields)


# Mitterreiter et al., "Why Capsule Neural Networks Do Not Scale" (AAAI 2023), their public
# code's recipe (EfficientCN, notebooks/affnist/paper_capsnet.ipynb): MNIST centred on 40x40,
# RandomAffine(+-8 deg, shear +-15 deg, scale 0.9-1.1), batch 128, Adam 1e-3 with weight decay
# 1e-5, x0.96 per epoch, 5 epochs; margin loss (0.9, 0.1, 0.5) + 0.005 x MSE. The project's
# reconstruction loss is the per-image *sum* of squared errors (mean over the batch), so their
# 0.005 x mean over pixels is recon_weight = 0.005 / 1600. Evaluated on the generated
# affNIST-style test set (see capsnet_ext.data.affnist); their model normalises its input.
SEED_PAPER_RECON_WEIGHT = 0.005 / (40 * 40)
SEED_PAPER_SEEDS = (0, 1, 2)
SEED_PAPER_DEPTHS = (1, 2, 3, 4, 5)      # hidden layers of 16 capsules
SEED_PAPER_ITERATIONS = (1, 4)           # weighted sums per routing (their n_iter 0 and 3)


def seed_paper_model(hidden_layers: int = 1, iterations: int = 4) -> Dict[str, Any]:
    """Model dict of Mitterreiter et al.'s CapsNet with ``hidden_layers`` hidden layers of 16
    8-D capsules between the 16 primary and the 10 class capsules (theirs: 1)."""
    if not isinstance(hidden_layers, int) or hidden_layers < 0:
        raise ValueError(f"hidden_layers must be an int >= 0, got {hidden_layers!r}")
    return dict(arch="mitterreiter-capsnet", input_size=40, in_channels=1, num_classes=10,
                primary_caps=16, primary_dim=8, caps=[16] * hidden_layers + [10],
                dims=[8] * (hidden_layers + 1), iterations=iterations, prior=True, temperature=1.0,
                init="uniform_fan_in", routing_bias=False)


PRESETS["seed-paper"] = _preset(
    dataset="affnist", dataset_options={"test_source": "generated"}, model=seed_paper_model(1, 4),
    epochs=5, batch_size=128, lr=1e-3, weight_decay=1e-5, lr_decay=0.96, lr_decay_per_epoch=True,
    recon_weight=SEED_PAPER_RECON_WEIGHT, margin=dict(m_pos=0.9, m_neg=0.1, lam=0.5), max_shift=0,
    random_affine=dict(degrees=8.0, shear=15.0, scale=[0.9, 1.1]), record_gradient_flow=True,
    grad_flow_every=1, checkpoint_every=100, out="runs/seed-paper")
# The depth study: 1..5 hidden layers, 1 or 4 routing iterations (3 seeds each, via --seed).
PRESETS["seed-paper-depth"] = _merge(PRESETS["seed-paper"], dict(out="runs/seed-paper-depth"))
for _hidden in SEED_PAPER_DEPTHS:
    for _iters in SEED_PAPER_ITERATIONS:
        _depth = copy.deepcopy(PRESETS["seed-paper"])
        _depth["model"] = seed_paper_model(_hidden, _iters)
        _depth["out"] = f"runs/seed-paper-depth/h{_hidden}-r{_iters}"
        PRESETS[f"seed-paper-depth-h{_hidden}-r{_iters}"] = _depth
