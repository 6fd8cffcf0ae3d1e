"""Ignite handlers for the bundles that MONAI does not have.

Everything else the bundles log or save goes through MONAI's own handlers (``StatsHandler``,
``TensorBoardStatsHandler``, ``CheckpointSaver``, ``ValidationHandler``, ``MetricsSaver``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from medseg.io import atomic_target

if TYPE_CHECKING:
    from ignite.engine import Engine

__all__ = ["CurvePlotter"]


def _is_main_process() -> bool:
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) or (
        torch.distributed.get_rank() == 0
    )


def _default_loss(output: Any) -> float:
    if isinstance(output, list):  # decollated batch: the loss is the same in every item
        output = output[0]
    value = output["loss"] if isinstance(output, dict) else output
    return float(value.item() if isinstance(value, torch.Tensor) else value)


class CurvePlotter:
    """Write a PNG with the mean training loss per epoch and the validation metric per validation run.

    Attach to the trainer; pass the validation ``evaluator`` to plot its key metric (or ``metric_name``).
    The figure is rewritten after every epoch (and at the end), atomically, by the main process only, so
    a run that stops early still leaves an up-to-date plot. The figure is drawn without pyplot (Agg canvas),
    so the process-wide Matplotlib backend is left untouched.
    """

    def __init__(
        self,
        output_file: str | os.PathLike[str],
        evaluator: Engine | None = None,
        metric_name: str | None = None,
        loss_transform: Callable[[Any], float] = _default_loss,
        title: str | None = None,
    ) -> None:
        self.output_file = Path(output_file)
        self.evaluator = evaluator
        self.metric_name = metric_name
        self.loss_transform = loss_transform
        self.title = title
        self.losses: list[tuple[int, float]] = []
        self.metrics: list[tuple[int, float]] = []
        self.metric_label: str = metric_name or "validation metric"
        self._epoch_losses: list[float] = []
        self._trainer: Engine | None = None

    def attach(self, engine: Engine) -> None:
        from ignite.engine import Events

        self._trainer = engine
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch)
        engine.add_event_handler(Events.COMPLETED, self._write)
        if self.evaluator is not None:
            self.evaluator.add_event_handler(Events.COMPLETED, self._validated)

    def state_dict(self) -> dict[str, Any]:
        """The curves so far (a resumed training continues them)."""
        return {
            "losses": [list(p) for p in self.losses],
            "metrics": [list(p) for p in self.metrics],
            "metric_label": self.metric_label,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.losses = [(int(e), float(v)) for e, v in state.get("losses", [])]
        self.metrics = [(int(e), float(v)) for e, v in state.get("metrics", [])]
        self.metric_label = str(state.get("metric_label", self.metric_label))

    def _iteration(self, engine: Engine) -> None:
        value = self.loss_transform(engine.state.output)
        if math.isfinite(value):
            self._epoch_losses.append(value)

    def _epoch(self, engine: Engine) -> None:
        if self._epoch_losses:
            self.losses.append((engine.state.epoch, sum(self._epoch_losses) / len(self._epoch_losses)))
        self._epoch_losses = []
        self._write(engine)

    def _validated(self, evaluator: Engine) -> None:
        name = self.metric_name or getattr(evaluator.state, "key_metric_name", None)
        value = evaluator.state.metrics.get(name) if name else None
        if value is None or self._trainer is None:
            return
        self.metrics.append((self._trainer.state.epoch, float(value)))
        self.metric_label = name
        self._write(self._trainer)

    def _write(self, engine: Engine) -> None:
        if not _is_main_process() or not (self.losses or self.metrics):
            return
        from matplotlib.figure import Figure  # no pyplot: renders with Agg, leaves the global backend alone

        fig = Figure(figsize=(10, 4), dpi=100)
        ax_loss, ax_metric = fig.subplots(1, 2)
        if self.losses:
            ax_loss.plot(*zip(*self.losses, strict=True), marker=".", label="training loss")
        ax_loss.set_xlabel("epoch")
        ax_loss.set_ylabel("loss")
        ax_loss.set_title("training loss (mean per epoch)")
        ax_loss.grid(True, alpha=0.3)
        label = self.metric_label
        if self.metrics:
            ax_metric.plot(*zip(*self.metrics, strict=True), marker="o", color="tab:orange", label=label)
            best = max(self.metrics, key=lambda p: p[1])
            ax_metric.set_title(f"{label} (best {best[1]:.4f} at epoch {best[0]})")
        else:
            ax_metric.set_title(label)
        ax_metric.set_xlabel("epoch")
        ax_metric.set_ylabel(label)
        ax_metric.set_ylim(0.0, 1.0)
        ax_metric.grid(True, alpha=0.3)
        if self.title:
            fig.suptitle(self.title)
        fig.tight_layout()
        self.output_file.parent.mkdir(parents=True, exist_ok=True)
        with atomic_target(self.output_file, ".png") as tmp:
            fig.savefig(tmp, format="png")
