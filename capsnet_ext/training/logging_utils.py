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


def format_duration(seconds: float) -> str:
    """``3.2 s``, ``4m05s``, ``2h03m``, ``3 days 4h``: short, for console lines."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days} days {hours}h"


class Console:
    """What a run tells the person watching it: a start-up line, a line per evaluation, a
    summary, and progress in between.

    On a terminal the progress is a tqdm bar (training steps, and the test batches while
    evaluating). Anywhere else (a log file, CI) a bar would write a line per refresh, so
    progress is a plain line at most every ``plain_interval_s`` seconds instead. ``enabled``
    False prints nothing (other DDP ranks); ``bar`` False keeps the lines but never draws a
    bar (``--no-progress``); ``summary`` False leaves the closing lines to the caller.
    """

    def __init__(self, stream=None, *, enabled: bool = True, bar: bool = True,
                 plain_interval_s: float = 60.0, prefix: str = "train", summary: bool = True):
        import sys
        import time

        self.stream = stream if stream is not None else sys.stdout
        self.enabled = enabled
        self.prefix = prefix
        self.summary = summary  # the trainer's closing lines (a caller with its own may skip them)
        self.terminal = bool(getattr(self.stream, "isatty", lambda: False)())
        self.bar_on = enabled and bar and self.terminal
        self.plain_on = enabled and bar and not self.terminal
        self.plain_interval_s = plain_interval_s
        self._clock = time.perf_counter
        self._last_plain = self._clock()
        self._bar = None

    def line(self, text: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.clear()
        print(f"{self.prefix}: {text}" if self.prefix else text, file=self.stream, flush=True)
        self._last_plain = self._clock()  # any line restarts the wait for the next progress line
        if self._bar is not None:
            self._bar.refresh()

    def start_bar(self, total: int, initial: int, desc: str) -> None:
        if self.bar_on:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True,
                             file=self.stream, leave=False)

    def advance(self, step: int, total: int, **postfix) -> None:
        """One training step done; ``postfix`` values are shown beside the bar (or in the
        occasional plain line)."""
        if self._bar is not None:
            if postfix:
                self._bar.set_postfix(postfix, refresh=False)
            self._bar.update(1)
        elif self.plain_on and self._clock() - self._last_plain >= self.plain_interval_s:
            self._last_plain = self._clock()
            extra = "".join(f", {k} {v}" for k, v in postfix.items())
            self.line(f"step {step}/{total} ({100 * step / max(total, 1):.0f}%){extra}")

    def close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def eval_progress(self, total_batches: int, n_items: int):
        """A callback ``done(batches)`` for evaluation: a transient bar on a terminal, one
        line saying what is being scored elsewhere."""
        if not self.enabled:
            return None
        if self.bar_on:
            from tqdm.auto import tqdm

            bar = tqdm(total=total_batches, desc=f"evaluating {n_items} test images", leave=False,
                       dynamic_ncols=True, file=self.stream,
                       position=1 if self._bar is not None else 0)

            def done(batches: int) -> None:
                bar.update(batches - bar.n)
                if batches >= total_batches:
                    bar.close()
            return done
        self.line(f"evaluating on {n_items} test images ...")
        return None
