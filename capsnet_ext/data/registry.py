"""``build_datasets(name, ...)``: one entry point for every task's train and test sets."""
from __future__ import annotations

import importlib
import inspect
from typing import Callable, Dict, Optional

from .base import DIGIT_CLASSES, DatasetBundle, ImageDataset
from .files import PathLike

# name -> "module:function"; modules load on first use so optional dependencies (scipy for
# .mat files, scikit-learn for digits) are only needed by the datasets that use them.
_BUILDERS: Dict[str, str] = {
    "mnist": "capsnet_ext.data.registry:build_mnist",
    "fashion-mnist": "capsnet_ext.data.registry:build_fashion_mnist",
    "multimnist": "capsnet_ext.data.multimnist:build_multimnist",
    "affnist": "capsnet_ext.data.affnist:build_affnist",
    "cifar10": "capsnet_ext.data.cifar:build_cifar10",
    "svhn": "capsnet_ext.data.svhn:build_svhn",
    "smallnorb": "capsnet_ext.data.smallnorb:build_smallnorb",
    "digits": "capsnet_ext.data.digits:build_digits",
}

DATASET_NAMES = tuple(_BUILDERS)


def build_datasets(name: str, data_dir: Optional[PathLike] = None, *, download: bool = True,
                   seed: int = 0, **options) -> DatasetBundle:
    """Train and test sets of one task, as a ``DatasetBundle``.

    Args:
        name: ``"mnist"``, ``"fashion-mnist"``, ``"multimnist"``, ``"affnist"``, ``"cifar10"``,
            ``"svhn"``, ``"smallnorb"`` or ``"digits"`` (scikit-learn's 8x8 digits resized to
            28x28: needs no download).
        data_dir: searched first for files, before ``$CAPSNET_DATA`` and the user cache.
        download: fetch missing files from public mirrors into the user cache (verified;
            a failed download leaves nothing behind). docs/data.md lists files and URLs.
        seed: seeds everything generated (MultiMNIST pairs, affine test set, digits split).
        **options: per dataset; every dataset takes ``train_limit`` / ``test_limit`` (keep the
            first N examples, for quick runs). See each builder for the rest, e.g. MultiMNIST's
            ``pairs_per_digit`` and affNIST's ``real_mat_dir``.

    Items of single-label datasets are ``{"image": float32 [C, H, W] in [0, 1], "label": int64}``;
    MultiMNIST items also carry ``"labels"`` (int64 [2]) and ``"components"`` (float32
    [2, 1, 36, 36]) and their ``"label"`` is a float32 multi-hot [10].
    """
    if name not in _BUILDERS:
        from .._cli import closest

        hint = closest(name, DATASET_NAMES)
        raise ValueError(f"dataset {name!r} is not known; expected one of "
                         f"{', '.join(DATASET_NAMES)}" + (f" (did you mean {hint!r}?)" if hint else ""))
    module_name, function_name = _BUILDERS[name].split(":")
    builder: Callable[..., DatasetBundle] = getattr(importlib.import_module(module_name), function_name)
    accepted = [p.name for p in inspect.signature(builder).parameters.values()
                if p.kind == p.KEYWORD_ONLY]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise TypeError(f"dataset {name!r} does not take option(s) {', '.join(unknown)}; it takes "
                        f"{', '.join(accepted)}")
    return builder(data_dir=data_dir, download=download, seed=seed, **options)


def _build_idx(name: str, data_dir, download, seed, train_limit=None, test_limit=None,
               mirrors=None, verify=True) -> DatasetBundle:
    from .mnist import load_idx_dataset
    del seed  # nothing is random in these datasets
    splits = {}
    for split, limit in (("train", train_limit), ("test", test_limit)):
        images, labels = load_idx_dataset(name, split, data_dir, download, mirrors, verify)
        splits[split] = ImageDataset(images[:, None], labels, name=f"{name}-{split}", limit=limit)
    from .mnist import FASHION_MNIST_CLASSES
    return DatasetBundle(train=splits["train"], test=splits["test"], in_channels=1, input_size=28,
                         num_classes=10, multi_label=False, name=name,
                         classes=FASHION_MNIST_CLASSES if name == "fashion-mnist" else DIGIT_CLASSES)


def build_mnist(data_dir=None, download=True, seed=0, *, train_limit: Optional[int] = None,
                test_limit: Optional[int] = None, mirrors=None, verify: bool = True) -> DatasetBundle:
    """MNIST: 60,000 / 10,000 images of 1x28x28.

    Options: ``train_limit``/``test_limit`` (first N examples), ``mirrors`` (download base URLs),
    ``verify`` (check the published MD5s; on by default).
    """
    return _build_idx("mnist", data_dir, download, seed, train_limit, test_limit, mirrors, verify)


def build_fashion_mnist(data_dir=None, download=True, seed=0, *, train_limit: Optional[int] = None,
                        test_limit: Optional[int] = None, mirrors=None,
                        verify: bool = True) -> DatasetBundle:
    """Fashion-MNIST: 60,000 / 10,000 images of 1x28x28. Options as ``build_mnist``."""
    return _build_idx("fashion-mnist", data_dir, download, seed, train_limit, test_limit,
                      mirrors, verify)
