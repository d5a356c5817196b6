"""Run logs: CSV files (one row per logged step) and TensorBoard scalars, written by rank 0."""
from __future__ import annotations

import csv
import io
import pathlib
import warnings
from typing import Dict, List, Optional

from .checkpoint import atomic_write_text


class CSVLog:
    """Append rows to a CSV file with a fixed header; flushes every row.

    ``truncate_after(step)`` drops rows logged after ``step`` (a resumed run starts from its
    checkpoint, so rows a crashed run wrote later would otherwise be duplicated).
    """

    def __init__(self, path: pathlib.Path, fields: List[str]):
        self.path = pathlib.Path(path)
        self.fields = fields
        self._handle = None

    def truncate_after(self, step: int) -> None:
        if not self.path.is_file():
            return
        with open(self.path, newline="") as handle:
            rows = [row for row in csv.DictReader(handle) if int(float(row["step"])) <= step]
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=self.fields, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow(row)
        atomic_write_text(self.path, buffer.getvalue())

    def write(self, row: Dict) -> None:
        if self._handle is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            new = not self.path.is_file() or self.path.stat().st_size == 0
            self._handle = open(self.path, "a", newline="")
            self._writer = csv.DictWriter(self._handle, fieldnames=self.fields, extrasaction="ignore")
            if new:
                self._writer.writeheader()
        self._writer.writerow({k: _fmt(row.get(k, "")) for k in self.fields})
        self._handle.flush()

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def _fmt(value):
    return f"{value:.6g}" if isinstance(value, float) else value


def read_csv(path: pathlib.Path) -> Dict[str, List[float]]:
    """Columns of a numeric CSV log as lists of floats (empty cells skipped per column)."""
    columns: Dict[str, List[float]] = {}
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            for key, value in row.items():
                columns.setdefault(key, [])
                try:
                    columns[key].append(float(value))
                except (TypeError, ValueError):
                    columns[key].append(float("nan"))
    return columns


class TensorBoardLog:
    """``torch.utils.tensorboard.SummaryWriter`` when tensorboard is installed; otherwise a
    warning once and nothing else (the CSV logs hold the same scalars)."""

    def __init__(self, log_dir: Optional[pathlib.Path]):
        self.writer = None
        if log_dir is None:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except Exception as exc:  # tensorboard is an optional extra
            warnings.warn(f"TensorBoard logging disabled: {exc}")
            return
        self.writer = SummaryWriter(log_dir=str(log_dir))

    def scalars(self, prefix: str, values: Dict[str, float], step: int) -> None:
        if self.writer is None:
            return
        for key, value in values.items():
            if isinstance(value, (int, float)):
                self.writer.add_scalar(f"{prefix}/{key}", value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
