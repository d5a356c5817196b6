"""Affine-robustness test in the manner of affNIST, and a reader for the real affNIST files.

The generated test set takes the MNIST test digits, pads them (centred) to 40x40 and warps each
with its own random affine map drawn within affNIST's ranges: rotation within +-20 degrees,
shear factor within +-0.2, horizontal and vertical scale each within 0.8..1.2, then a
translation drawn uniformly among those that keep the whole transformed digit inside the
40x40 frame. The map is ``p = A (q - c) + c + t`` with ``A = R(rotation) @ Shear(shear) @
diag(scale_x, scale_y)``, ``c`` the frame centre, ``q`` a source pixel and ``p`` where it lands;
images are resampled bilinearly and stored as uint8 like the real affNIST. Everything is
deterministic given ``seed``; the parameters of every image are kept (``AffineMNIST.params``).

Training follows the paper: MNIST training digits padded to 40x40 (centred); the trainer adds
random shifts (``random_shift``), and never sees an affine transformation.

The real affNIST (www.cs.toronto.edu/~tijmen/affNIST/) ships MATLAB files whose struct
``affNISTdata`` has ``image`` (1600 x N, one 40x40 row-major image per column) and
``label_int``; ``load_affnist_mat`` reads one file (``test.mat``) or a folder of batch files
(``test_batches/1.mat`` ... ``32.mat``).
"""
from __future__ import annotations

import hashlib
import math
import pathlib
import re
from typing import Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .base import DIGIT_CLASSES, DatasetBundle, ImageDataset, _check_limit
from .files import CorruptDataError, DataNotFoundError, PathLike, data_roots, not_found_message
from .transforms import pad_to

FRAME_SIZE = 40
ROTATION_DEGREES = 20.0
SHEAR = 0.2
SCALE_RANGE = (0.8, 1.2)


def affine_matrices(rotation_degrees: torch.Tensor, shear: torch.Tensor, scale_x: torch.Tensor,
                    scale_y: torch.Tensor) -> torch.Tensor:
    """``[N, 2, 2]`` maps ``A = R @ Shear @ diag(scale_x, scale_y)`` acting on ``(x, y)`` columns.

    ``Shear = [[1, shear], [0, 1]]`` (x moves in proportion to y); ``R`` rotates by the angle in
    degrees (counter-clockwise on the screen for positive angles, since y points down).
    """
    theta = torch.deg2rad(rotation_degrees.to(torch.float64))
    cos, sin = torch.cos(theta), -torch.sin(theta)   # y grows downwards on the screen
    one, zero = torch.ones_like(cos), torch.zeros_like(cos)
    rotation = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
    shearing = torch.stack([torch.stack([one, shear.to(torch.float64)], -1),
                            torch.stack([zero, one], -1)], -2)
    scaling = torch.diag_embed(torch.stack([scale_x, scale_y], -1).to(torch.float64))
    return rotation @ shearing @ scaling


def _content_corners(images: torch.Tensor, margin: float) -> torch.Tensor:
    """Corners ``[N, 4, 2]`` (x, y) of each image's non-zero box, grown by ``margin`` pixels."""
    mask = images.reshape(images.shape[0], *images.shape[-2:]) > 0
    size_y, size_x = mask.shape[-2:]
    rows, cols = mask.any(dim=2), mask.any(dim=1)
    ys = torch.arange(size_y, dtype=torch.float64)
    xs = torch.arange(size_x, dtype=torch.float64)
    inf = torch.tensor(math.inf, dtype=torch.float64)
    y0 = torch.where(rows, ys, inf).amin(1) - margin
    y1 = torch.where(rows, ys, -inf).amax(1) + margin
    x0 = torch.where(cols, xs, inf).amin(1) - margin
    x1 = torch.where(cols, xs, -inf).amax(1) + margin
    empty = ~rows.any(1)   # a blank image: its box is the centre point
    centre_x, centre_y = (size_x - 1) / 2, (size_y - 1) / 2
    x0, x1 = torch.where(empty, centre_x, x0), torch.where(empty, centre_x, x1)
    y0, y1 = torch.where(empty, centre_y, y0), torch.where(empty, centre_y, y1)
    return torch.stack([torch.stack([x0, y0], -1), torch.stack([x1, y0], -1),
                        torch.stack([x0, y1], -1), torch.stack([x1, y1], -1)], 1)


def random_affine_params(images: torch.Tensor, seed: int = 0,
                         rotation_degrees: float = ROTATION_DEGREES, shear: float = SHEAR,
                         scale_range: Tuple[float, float] = SCALE_RANGE) -> Dict[str, torch.Tensor]:
    """affNIST-style parameters for each of ``images [N, 1, S, S]`` (already on the frame).

    Rotation, shear and scales are uniform in their ranges; the translation ``(tx, ty)`` is
    uniform within the interval that keeps the transformed content box (grown by one pixel,
    the reach of bilinear resampling) inside the frame, per axis. Returns float64 tensors
    ``rotation, shear, scale_x, scale_y, translate_x, translate_y`` of shape ``[N]``.
    """
    count, size = images.shape[0], images.shape[-1]
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), 7])))
    draw = lambda low, high: torch.from_numpy(rng.uniform(low, high, size=count))  # noqa: E731
    params = {"rotation": draw(-rotation_degrees, rotation_degrees), "shear": draw(-shear, shear),
              "scale_x": draw(*scale_range), "scale_y": draw(*scale_range)}
    matrices = affine_matrices(params["rotation"], params["shear"], params["scale_x"],
                               params["scale_y"])
    centre = (size - 1) / 2
    corners = _content_corners(images, margin=1.0) - centre                # [N, 4, 2]
    moved = corners @ matrices.transpose(1, 2) + centre                    # [N, 4, 2]
    low = -moved.amin(1)                                                   # [N, 2] smallest t
    high = (size - 1) - moved.amax(1)                                      # [N, 2] largest t
    fraction = torch.from_numpy(rng.uniform(0.0, 1.0, size=(count, 2)))
    # A digit too large for the frame (not possible within these ranges on 28x28 MNIST) is
    # centred instead.
    translate = torch.where(high >= low, low + fraction * (high - low), (low + high) / 2)
    params["translate_x"], params["translate_y"] = translate[:, 0], translate[:, 1]
    return params


def warp(images: torch.Tensor, params: Dict[str, torch.Tensor]) -> torch.Tensor:
    """Apply ``p = A (q - c) + c + t`` to ``images [N, C, S, S]`` (bilinear, zeros outside).

    Returns float32 ``[N, C, S, S]`` in the input's value range.
    """
    count, _, size, _ = images.shape
    matrices = affine_matrices(params["rotation"], params["shear"], params["scale_x"],
                               params["scale_y"])
    translate = torch.stack([params["translate_x"], params["translate_y"]], -1)   # [N, 2]
    centre = (size - 1) / 2
    inverse = torch.linalg.inv(matrices)                                         # [N, 2, 2]
    coords = torch.arange(size, dtype=torch.float64) - centre
    # Inverse map: each output pixel p samples the source at A^-1 (p - c - t) + c, written out
    # per entry because batched 2x2 matmuls are slow.
    dx = coords[None, None, :] - translate[:, 0, None, None]                     # [N, 1, S]
    dy = coords[None, :, None] - translate[:, 1, None, None]                     # [N, S, 1]
    inv = inverse[:, :, :, None, None]
    source_x = inv[:, 0, 0] * dx + inv[:, 0, 1] * dy + centre                   # [N, S, S]
    source_y = inv[:, 1, 0] * dx + inv[:, 1, 1] * dy + centre
    normalised = torch.stack([source_x, source_y], -1) / (size - 1) * 2 - 1     # [N, S, S, 2]
    # Coordinates are computed in float64; float32 sampling is exact to ~1e-5 pixel here.
    return F.grid_sample(images.to(torch.float32), normalised.to(torch.float32), mode="bilinear",
                         padding_mode="zeros", align_corners=True)


class AffineMNIST(ImageDataset):
    """Affine-transformed 40x40 digits (uint8) with their per-image ``params`` (see module doc)."""

    def __init__(self, images, labels, params: Dict[str, torch.Tensor], name: str = "affnist-test",
                 limit: Optional[int] = None):
        super().__init__(images, labels, name=name, limit=limit)
        self.params = {key: value[:len(self)] for key, value in params.items()}


def make_affine_test_set(digits, labels, seed: int = 0, frame_size: int = FRAME_SIZE,
                         limit: Optional[int] = None, chunk: int = 2000) -> AffineMNIST:
    """Warp ``digits [N, 28, 28]`` uint8 onto ``frame_size`` squares (module docstring recipe)."""
    limit = _check_limit(limit, "limit")
    digits = torch.as_tensor(np.array(digits[:limit] if limit else digits))
    labels = torch.as_tensor(np.array(labels[:limit] if limit else labels))
    framed = pad_to(digits[:, None], frame_size)
    params = random_affine_params(framed, seed)
    out = torch.empty_like(framed)
    for start in range(0, framed.shape[0], chunk):   # bounded memory for the float64 grids
        part = slice(start, start + chunk)
        warped = warp(framed[part], {key: value[part] for key, value in params.items()})
        out[part] = warped.round_().clamp_(0, 255).to(torch.uint8)
    return AffineMNIST(out, labels, params, name="affnist-test")


def _mat_batches(path: pathlib.Path):
    if path.is_file():
        return [path]
    files = [p for p in path.glob("*.mat")]
    numbered = [p for p in files if re.fullmatch(r"\d+", p.stem)]
    if numbered:   # test_batches/1.mat ... 32.mat, in numeric order
        return sorted(numbered, key=lambda p: int(p.stem))
    return sorted(files)


def load_affnist_mat(path: PathLike, limit: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Images ``[N, 40, 40]`` uint8 and labels ``[N]`` from a real affNIST ``.mat`` file or folder.

    A folder is read as its numbered batch files in order (``1.mat``, ``2.mat``, ...), else every
    ``.mat`` file in name order. Needs scipy.
    """
    from scipy.io import loadmat
    path = pathlib.Path(path)
    if not path.exists():
        raise DataNotFoundError(f"affNIST: {path} does not exist")
    batches = _mat_batches(path)
    if not batches:
        raise DataNotFoundError(f"affNIST: no .mat files in {path}")
    images, labels, total = [], [], 0
    for batch_path in batches:
        try:
            data = loadmat(batch_path, struct_as_record=False, squeeze_me=True)["affNISTdata"]
            image = np.asarray(data.image)
            label = np.asarray(data.label_int).reshape(-1)
        except Exception as exc:
            raise CorruptDataError(f"{batch_path}: not a readable affNIST .mat file "
                                   f"(expected struct affNISTdata with image and label_int): {exc}") from exc
        if image.ndim == 1:
            image = image[:, None]
        if image.shape[0] != FRAME_SIZE * FRAME_SIZE or image.shape[1] != label.size:
            raise CorruptDataError(f"{batch_path}: affNISTdata.image must be [1600, N] with N = "
                                   f"{label.size} labels, got {image.shape}")
        images.append(image.T.reshape(-1, FRAME_SIZE, FRAME_SIZE).astype(np.uint8))
        labels.append(label.astype(np.int64))
        total += label.size
        if limit is not None and total >= limit:
            break
    images, labels = np.concatenate(images), np.concatenate(labels)
    return (images[:limit], labels[:limit]) if limit else (images, labels)


_generated_test_sets: Dict[tuple, AffineMNIST] = {}


def _find_real_affnist(data_dir) -> Optional[pathlib.Path]:
    for root in data_roots(data_dir):
        for candidate in ("affnist/test.mat", "affnist/test_batches", "affnist/transformed/test.mat",
                          "affnist/transformed/test_batches"):
            if (root / candidate).exists():
                return root / candidate
    return None


def build_affnist(data_dir=None, download=True, seed=0, *, test_source: str = "generated",
                  real_mat_dir: Optional[PathLike] = None, train_limit: Optional[int] = None,
                  test_limit: Optional[int] = None, mirrors=None, verify: bool = True) -> DatasetBundle:
    """Train on MNIST padded to 40x40, test on affine-transformed digits.

    Options:
        test_source: ``"generated"`` (MNIST test digits warped as above, deterministic by
            ``seed``), ``"real"`` (the real affNIST test files: ``real_mat_dir``, or found under
            ``<root>/affnist/`` as ``test.mat`` or ``test_batches/``) or ``"auto"`` (real if found).
        real_mat_dir: a real affNIST ``.mat`` file or folder of batch files; implies "real".
        train_limit, test_limit: keep the first N examples.
    """
    from .mnist import load_idx_dataset
    if test_source not in ("generated", "real", "auto"):
        raise ValueError(f"test_source must be 'generated', 'real' or 'auto', got {test_source!r}")
    train_limit, test_limit = _check_limit(train_limit, "train_limit"), _check_limit(test_limit, "test_limit")
    digits, labels = load_idx_dataset("mnist", "train", data_dir, download, mirrors, verify)
    limit = train_limit or digits.shape[0]
    train = ImageDataset(pad_to(torch.from_numpy(np.array(digits[:limit]))[:, None], FRAME_SIZE),
                         labels[:limit], name="affnist-train")
    real_path = pathlib.Path(real_mat_dir) if real_mat_dir is not None else None
    if real_path is None and test_source in ("real", "auto"):
        real_path = _find_real_affnist(data_dir)
        if real_path is None and test_source == "real":
            folders = [root / "affnist" for root in data_roots(data_dir)]
            raise DataNotFoundError(not_found_message(
                "affnist", ["test.mat", "test_batches/*.mat"], folders, "affnist",
                "affNIST is not downloaded automatically; get it from "
                "www.cs.toronto.edu/~tijmen/affNIST/ (the 'transformed' test set)."))
    if real_path is not None:
        images, test_labels = load_affnist_mat(real_path, test_limit)
        test = ImageDataset(images[:, None], test_labels, name="affnist-test-real")
    else:
        test_digits, test_labels = load_idx_dataset("mnist", "test", data_dir, download, mirrors, verify)
        # Generated sets are kept for the process, keyed by the source digits' content.
        source = hashlib.md5(np.ascontiguousarray(test_digits).tobytes(), usedforsecurity=False)
        source.update(np.ascontiguousarray(test_labels).tobytes())
        key = (source.hexdigest(), int(seed), test_limit)
        test = _generated_test_sets.get(key)
        if test is None:
            test = make_affine_test_set(test_digits, test_labels, seed=seed, limit=test_limit)
            _generated_test_sets[key] = test
    return DatasetBundle(train=train, test=test, in_channels=1, input_size=FRAME_SIZE,
                         num_classes=10, multi_label=False, name="affnist", classes=DIGIT_CLASSES)
