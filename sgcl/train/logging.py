"""Training metrics to CSV, JSONL and TensorBoard (rank 0 only; a no-op elsewhere).

Every row has ``step`` and ``epoch`` plus whatever the trainer logs: each loss term, ``lr``,
``img_per_s``, and the method's diagnostics (e.g. positives per anchor). The CSV's columns are
fixed by the first row (extra keys of later rows go to the JSONL only); files are appended to on
resume, after :meth:`MetricLogger.truncate_after` drops the rows logged after the checkpoint's step
(a run killed between checkpoints redoes those steps, so they would otherwise appear twice).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any, Mapping


def read_metric_rows(run_dir: str | Path) -> list[dict]:
    """The rows a run logged (``<run_dir>/metrics.jsonl``, in order); empty when there is none."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _scalar(v: Any) -> float | int | str:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


class MetricLogger:
    def __init__(self, out_dir: str | Path, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.out_dir = Path(out_dir)
        self._csv_fields: list[str] | None = None
        self._tb = None
        self._tb_wanted = tensorboard
        self._purge_step: int | None = None
        if not enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.csv_path = self.out_dir / "metrics.csv"
        self.jsonl_path = self.out_dir / "metrics.jsonl"
        if self.csv_path.is_file() and self.csv_path.stat().st_size > 0:
            with open(self.csv_path, newline="") as fh:
                self._csv_fields = next(csv.reader(fh), None)

    def truncate_after(self, step: int) -> None:
        """Keep only the rows of steps ``<= step`` in ``metrics.jsonl`` and ``metrics.csv`` (each rewritten
        atomically; a torn last line of a killed run goes too), and purge TensorBoard events after ``step``."""
        if not self.enabled:
            return
        from sgcl.utils.atomic import atomic_path

        self._purge_step = int(step) + 1
        if self.jsonl_path.is_file():
            kept = []
            for line in self.jsonl_path.read_text().splitlines():
                try:
                    if int(json.loads(line)["step"]) <= step:
                        kept.append(line)
                except (ValueError, KeyError, TypeError):
                    continue
            with atomic_path(self.jsonl_path) as tmp:
                Path(tmp).write_text("".join(f"{line}\n" for line in kept))
        if self.csv_path.is_file() and self._csv_fields:
            with open(self.csv_path, newline="") as fh:
                rows = list(csv.reader(fh))[1:]
            col = self._csv_fields.index("step") if "step" in self._csv_fields else None
            with atomic_path(self.csv_path) as tmp:
                with open(tmp, "w", newline="") as fh:
                    w = csv.writer(fh)
                    w.writerow(self._csv_fields)
                    for r in rows:
                        try:
                            if col is not None and len(r) == len(self._csv_fields) and int(r[col]) <= step:
                                w.writerow(r)
                        except ValueError:
                            continue

    def _writer(self):
        """The TensorBoard writer, opened at the first row (after a resume, events after its step purged)."""
        if self._tb is None and self._tb_wanted:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.out_dir / "tensorboard"), purge_step=self._purge_step)
            except Exception:  # noqa: BLE001 - tensorboard is optional
                self._tb_wanted = False
        return self._tb

    def log(self, row: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        row = {k: _scalar(v) for k, v in row.items()}
        with open(self.jsonl_path, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        if self._csv_fields is None:
            self._csv_fields = list(row)
            with open(self.csv_path, "w", newline="") as fh:
                csv.writer(fh).writerow(self._csv_fields)
        with open(self.csv_path, "a", newline="") as fh:
            csv.writer(fh).writerow([row.get(k, "") for k in self._csv_fields])
        tb = self._writer()
        if tb is not None:
            step = int(row.get("step", 0))
            for k, v in row.items():
                if k not in ("step", "epoch") and isinstance(v, (int, float)):
                    tb.add_scalar(f"train/{k}", v, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
            self._tb = None


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]
