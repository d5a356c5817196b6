"""MultiMNIST: two overlapping digits of different classes on a 36x36 canvas (the paper's recipe).

Each example overlays a *base* digit and a *partner* digit from the same split (MNIST train for
the training set, MNIST test for the test set) whose class differs. Each digit is centred on
the 36x36 canvas (4 pixels of zero padding each side) and shifted independently by a random
whole number of pixels in ``[-4, 4]`` in x and y, so it always stays fully on the canvas; the
two are merged pixel-wise as ``min(a + b, 1)`` (the official generator's ``min(a + b, 255)`` on
bytes). The paper draws 1000 pairs per training digit (60M training examples) and builds the
test set likewise from the test digits (1000 per digit: 10M examples).

What is stored is the recipe, not the pixels: for every example its partner's index and the
four shifts (``int32`` + 4 ``int8``: 8 bytes per example, 480 MB for the paper's 60M), generated
deterministically from ``seed`` and cached on disk as ``.npz`` (written atomically), keyed by
every parameter. Images are composed on demand, per item or per batch (``batch``, vectorised,
on any device). Example ``i`` uses base digit ``i % N`` in its ``i // N``-th pairing, so the
first ``N`` examples use every digit once as the base and a ``limit`` keeps a representative
subset.
"""
from __future__ import annotations

import hashlib
import pathlib
import warnings
from typing import Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from .base import DIGIT_CLASSES, DatasetBundle, _as_tensor, _check_limit, to_float_image
from .files import (PathLike, atomic_save, cached_in_memory, data_roots, user_cache_dir,
                    writable_dir)
from .transforms import pad_to, shift_images

CANVAS_SIZE = 36
MAX_SHIFT = 4
FORMAT_VERSION = 1
_SPLIT_CODES = {"train": 0, "test": 1}


def generate_pairs(labels: np.ndarray, pairs_per_digit: int, max_shift: int = MAX_SHIFT,
                   seed: int = 0, stream: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """The MultiMNIST recipe for one split.

    Args:
        labels: ``[N]`` class of every source digit (at least two classes present).
        pairs_per_digit: ``P``, pairings drawn for every base digit.
        max_shift: shifts are uniform integers in ``[-max_shift, max_shift]``.
        seed, stream: the random stream is ``SeedSequence([seed, stream])`` (one stream per split).

    Returns:
        ``partners [P, N] int32``: the partner of base digit ``n`` in pairing ``p``, always of
        another class (a class drawn uniformly among the others, then a digit uniformly within
        it); ``shifts [P, N, 4] int8``: ``(dx_base, dy_base, dx_partner, dy_partner)``.
    """
    labels = np.asarray(labels).astype(np.int64)
    if labels.ndim != 1 or labels.size == 0:
        raise ValueError(f"labels must be a non-empty [N] array, got shape {labels.shape}")
    if isinstance(pairs_per_digit, bool) or not isinstance(pairs_per_digit, (int, np.integer)) \
            or pairs_per_digit < 1:
        raise ValueError(f"pairs_per_digit must be a positive int, got {pairs_per_digit!r}")
    if not 0 <= max_shift <= 127:
        raise ValueError(f"max_shift must be in [0, 127], got {max_shift}")
    num_classes = int(labels.max()) + 1
    counts = np.bincount(labels, minlength=num_classes)
    present = np.flatnonzero(counts)
    if present.size < 2:
        raise ValueError("MultiMNIST needs digits of at least two classes")
    order = np.argsort(labels, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    # Position of each digit's class among the present classes, to draw "another class".
    rank = np.full(num_classes, -1)
    rank[present] = np.arange(present.size)
    base_rank = rank[labels]
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), int(stream)])))
    n = labels.size
    partners = np.empty((pairs_per_digit, n), dtype=np.int32)
    shifts = np.empty((pairs_per_digit, n, 4), dtype=np.int8)
    for pairing in range(pairs_per_digit):
        # One pairing at a time keeps the temporaries at O(N) for any P.
        offset = rng.integers(1, present.size, size=n)
        partner_class = present[(base_rank + offset) % present.size]
        within = np.minimum((rng.random(n) * counts[partner_class]).astype(np.int64),
                            counts[partner_class] - 1)
        partners[pairing] = order[starts[partner_class] + within]
        shifts[pairing] = rng.integers(-max_shift, max_shift + 1, size=(n, 4))
    return partners, shifts


def compose(base: torch.Tensor, partner: torch.Tensor, shifts: torch.Tensor,
            canvas_size: int = CANVAS_SIZE) -> Tuple[torch.Tensor, torch.Tensor]:
    """Place two batches of digits on the canvas and merge them.

    Args:
        base, partner: ``[B, H, W]`` digits, uint8 (0..255) or float in [0, 1].
        shifts: ``[B, 4]`` integer ``(dx_base, dy_base, dx_partner, dy_partner)``.
        canvas_size: side of the square canvas (36).

    Returns:
        ``(image [B, 1, S, S], components [B, 2, 1, S, S])`` float32 in [0, 1], where
        ``image = min(components[:, 0] + components[:, 1], 1)``.
    """
    pair = torch.stack([to_float_image(base), to_float_image(partner)], dim=1)  # [B, 2, H, W]
    batch = pair.shape[0]
    canvas = pad_to(pair, canvas_size).reshape(batch * 2, 1, canvas_size, canvas_size)
    shifts = shifts.to(device=pair.device, dtype=torch.int64)
    dx = shifts[:, 0::2].reshape(-1)   # [B * 2] in (base, partner) order
    dy = shifts[:, 1::2].reshape(-1)
    components = shift_images(canvas, dx, dy).reshape(batch, 2, 1, canvas_size, canvas_size)
    image = components.sum(dim=1).clamp_(max=1.0)
    return image, components


class MultiMNIST(Dataset):
    """Pairs of digits composed on demand from a stored recipe (see the module docstring).

    Items: ``{"image": float32 [1, 36, 36], "label": float32 multi-hot [10], "labels": int64
    [2] (base class, partner class), "components": float32 [2, 1, 36, 36]}`` (each digit alone
    on the canvas: the two reconstruction targets).
    """

    def __init__(self, digits, labels, partners: np.ndarray, shifts: np.ndarray,
                 canvas_size: int = CANVAS_SIZE, num_classes: int = 10,
                 limit: Optional[int] = None, name: str = "multimnist"):
        self.digits = _as_tensor(digits)                                   # [N, 28, 28]
        self.digit_labels = _as_tensor(labels).to(torch.int64)             # [N]
        self.partners = torch.from_numpy(np.ascontiguousarray(partners))   # [P, N] int32
        self.shifts = torch.from_numpy(np.ascontiguousarray(shifts))       # [P, N, 4] int8
        num_digits = self.digits.shape[0]
        if self.partners.dim() != 2 or self.partners.shape[1] != num_digits:
            raise ValueError(f"partners must be [P, {num_digits}], got {tuple(self.partners.shape)}")
        if tuple(self.shifts.shape) != tuple(self.partners.shape) + (4,):
            raise ValueError(f"shifts must be [P, N, 4] = {tuple(self.partners.shape) + (4,)}, "
                             f"got {tuple(self.shifts.shape)}")
        self.canvas_size = canvas_size
        self.num_classes = num_classes
        self.name = name
        total = self.partners.numel()
        limit = _check_limit(limit, "limit")
        self._length = total if limit is None else min(total, limit)

    def __len__(self) -> int:
        return self._length

    def pair_indices(self, indices: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(base [B], partner [B], shifts [B, 4])`` for example indices ``[B]``."""
        num_digits = self.digits.shape[0]
        pairing, base = indices // num_digits, indices % num_digits
        partner = self.partners[pairing, base].to(torch.int64)
        return base, partner, self.shifts[pairing, base]

    def batch(self, indices: Union[Sequence[int], torch.Tensor],
              device: Union[str, torch.device, None] = None) -> Dict[str, torch.Tensor]:
        """A whole batch at once: every item field with a leading ``[B]`` dimension, on ``device``."""
        indices = torch.as_tensor(indices, dtype=torch.int64).reshape(-1)
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= len(self)):
            raise IndexError(f"{self.name}: indices must be in [0, {len(self)}), got "
                             f"[{int(indices.min())}, {int(indices.max())}]")
        base, partner, shifts = self.pair_indices(indices)
        image, components = compose(self.digits[base].to(device), self.digits[partner].to(device),
                                    shifts.to(device), self.canvas_size)
        labels = torch.stack([self.digit_labels[base], self.digit_labels[partner]], dim=1).to(device)
        multi_hot = torch.zeros(labels.shape[0], self.num_classes, device=labels.device)
        multi_hot.scatter_(1, labels, 1.0)
        return {"image": image, "label": multi_hot, "labels": labels, "components": components}

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        if index < 0:
            index += len(self)
        item = self.batch([index])
        return {key: value[0] for key, value in item.items()}

    def __repr__(self) -> str:
        return (f"MultiMNIST({self.name}, n={len(self)}, digits={self.digits.shape[0]}, "
                f"pairs_per_digit={self.partners.shape[0]})")


def _labels_digest(labels: np.ndarray) -> str:
    return hashlib.md5(np.ascontiguousarray(labels, dtype=np.uint8).tobytes()).hexdigest()[:12]


def _read_recipe(path: pathlib.Path) -> Tuple[np.ndarray, np.ndarray, str]:
    with np.load(path) as stored:
        return stored["partners"], stored["shifts"], str(stored["labels_digest"])


def cached_pairs(labels: np.ndarray, split: str, pairs_per_digit: int, max_shift: int, seed: int,
                 source: str, data_dir: Optional[PathLike] = None,
                 cache_dir: Optional[PathLike] = None) -> Tuple[np.ndarray, np.ndarray, pathlib.Path]:
    """``generate_pairs`` through an on-disk ``.npz`` cache keyed by every parameter.

    Looked for in ``cache_dir`` (if given) else ``<root>/multimnist/`` of every data root (so a
    recipe file can be shipped beside the data); written to ``cache_dir``, else the user cache
    (never into a data folder, which may be shared). A cache file that cannot be read, or that
    was made for other source labels, is regenerated. Arrays read from disk stay in memory for
    the life of the process.
    Returns ``(partners, shifts, path)``.
    """
    digest = _labels_digest(labels)
    filename = (f"multimnist-{source}-{split}-n{labels.size}-{digest}-p{pairs_per_digit}"
                f"-shift{max_shift}-seed{seed}-v{FORMAT_VERSION}.npz")
    if cache_dir is not None:
        folders = [pathlib.Path(cache_dir)]
        targets = folders
    else:
        folders = [root / "multimnist" for root in data_roots(data_dir)]
        # New files go to the user cache only: data folders may be shared or read-only.
        targets = [user_cache_dir() / "multimnist"]
    for folder in folders:
        path = folder / filename
        if path.is_file():
            try:
                partners, shifts, stored_digest = cached_in_memory([path], ("multimnist",),
                                                                   lambda: _read_recipe(path))
                ok = (partners.shape == (pairs_per_digit, labels.size)
                      and shifts.shape == (pairs_per_digit, labels.size, 4)
                      and stored_digest == digest)
                if ok:
                    return partners, shifts, path
            except Exception as exc:  # a damaged cache is only a cache: rebuild it
                warnings.warn(f"MultiMNIST cache {path} is unreadable ({exc}); regenerating it")
    partners, shifts = generate_pairs(labels, pairs_per_digit, max_shift, seed,
                                      stream=_SPLIT_CODES[split])
    path = writable_dir(targets) / filename

    def save(tmp: str) -> None:
        with open(tmp, "wb") as handle:   # a file object: np.savez would append ".npz" to a name
            np.savez(handle, partners=partners, shifts=shifts, labels_digest=np.array(digest))
    atomic_save(path, save)
    return partners, shifts, path


def build_multimnist(data_dir=None, download=True, seed=0, *, pairs_per_digit: int = 1000,
                     test_pairs_per_digit: int = 1000, max_shift: int = MAX_SHIFT,
                     source: str = "mnist", cache_dir: Optional[PathLike] = None,
                     train_limit: Optional[int] = None, test_limit: Optional[int] = None,
                     mirrors=None, verify: bool = True) -> DatasetBundle:
    """MultiMNIST train and test sets.

    Options:
        pairs_per_digit: pairings per training digit (1000 in the paper: 60M examples).
        test_pairs_per_digit: pairings per test digit (1000: 10M examples, as in the paper;
            pass ``test_limit`` to evaluate on the first N, which use N distinct base digits).
        max_shift: per-digit shift bound in pixels (4).
        source: ``"mnist"`` (the paper) or ``"fashion-mnist"``.
        cache_dir: where the recipe ``.npz`` files are read and written (default: found in
            ``<root>/multimnist/`` of any data root, written to the user cache).
        train_limit, test_limit: keep the first N examples (the same as the first N of the
            full set; only the pairings they use are generated).
    """
    from .mnist import load_idx_dataset
    if source not in ("mnist", "fashion-mnist"):
        raise ValueError(f"source must be 'mnist' or 'fashion-mnist', got {source!r}")
    splits = {}
    for split, pairs, limit in (("train", pairs_per_digit, train_limit),
                                ("test", test_pairs_per_digit, test_limit)):
        digits, labels = load_idx_dataset(source, split, data_dir, download, mirrors, verify)
        limit = _check_limit(limit, f"{split}_limit")
        if limit is not None:
            # Pairings are drawn one after another from one stream, so the first k of them do
            # not depend on how many follow: a limited set is a prefix of the full one, and
            # only the pairings it reaches are generated.
            pairs = min(pairs, -(-limit // labels.size))
        partners, shifts, _ = cached_pairs(labels, split, pairs, max_shift, seed, source,
                                           data_dir, cache_dir)
        splits[split] = MultiMNIST(digits, labels, partners, shifts, limit=limit,
                                   name=f"multimnist-{split}")
    return DatasetBundle(train=splits["train"], test=splits["test"], in_channels=1,
                         input_size=CANVAS_SIZE, num_classes=10, multi_label=True,
                         name="multimnist", classes=DIGIT_CLASSES)
