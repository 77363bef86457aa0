"""Progress events and results shared by every training loop."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Progress:
    """One progress report.

    Attributes
    ----------
    step, total : int
        Steps done so far and steps planned (including resumed ones).
    losses : dict of str to float
        Latest loss values (running means over the last report interval).
    images_per_s : float
        Training throughput over the last report interval.
    eta_s : float
        Estimated seconds to the end.
    message : str
        Human-readable status ("checkpoint saved", "validation ...").
    stage : str
        Which part of a fine-tune it is from (``enhancer``, ``teacher``, ``student``, ``check``);
        empty from a single training loop.
    """

    step: int
    total: int
    losses: dict = field(default_factory=dict)
    images_per_s: float = 0.0
    eta_s: float = float("nan")
    message: str = ""
    stage: str = ""


@dataclass
class TrainResult:
    """What a training run produced."""

    output: Path | None
    steps_done: int
    cancelled: bool
    best_step: int | None = None
    best_score: float | None = None
    history: list = field(default_factory=list)
    skipped: dict = field(default_factory=dict)  # reason -> names of the training files not used
    parts: dict = field(default_factory=dict)  # other networks the run trained, by role (a student's "reverse")


class Meter:
    """Running means of losses and throughput between reports."""

    def __init__(self, total: int, start_step: int):
        self.total, self.start_step = total, start_step
        self.sums: dict[str, float] = {}
        self.count = 0
        self.images = 0
        self.t0 = self.t_last = time.perf_counter()

    def add(self, losses: dict, images: int) -> None:
        for k, v in losses.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)
        self.count += 1
        self.images += images

    def report(self, step: int, message: str = "") -> Progress:
        now = time.perf_counter()
        rate = self.images / max(now - self.t_last, 1e-9)
        steps_per_s = (step - self.start_step) / max(now - self.t0, 1e-9)
        eta = (self.total - step) / steps_per_s if steps_per_s > 0 else float("nan")
        losses = {k: v / max(self.count, 1) for k, v in self.sums.items()}
        self.sums, self.count, self.images, self.t_last = {}, 0, 0, now
        return Progress(step, self.total, losses, rate, eta, message)


def stop_requested(stop: threading.Event | None) -> bool:
    return stop is not None and stop.is_set()
