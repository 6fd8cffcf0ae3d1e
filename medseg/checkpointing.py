"""Resumable training for the bundles' MONAI trainers.

:class:`TrainingCheckpoint` (an Ignite handler attached to the trainer) writes ``models/checkpoint.pt``
every ``interval`` epochs and at the end of the run, atomically: the network, optimizer, LR scheduler and
gradient scaler states, the trainer's epoch and iteration, the random number generator states (torch,
NumPy, Python and every random transform of the training data) and the validation's best key metric. With
``resume`` (``--resume true`` on the ``monai.bundle`` command line) a run loads it when it starts and
continues at the saved epoch; a seeded CPU run resumed this way ends with the same weights as one that was
never interrupted.

It also keeps the best key metric across runs: MONAI's ``CheckpointSaver`` (``best_saver``) writes
``models/model.pt`` whenever the validation metric beats the best it has seen *in this run*; the handler
records that best next to the model (``models/model_key_metric.json``) and gives it back to the saver when
a run starts, so a restart never replaces a better ``model.pt`` by a worse one. Delete the sidecar (or
``models/``) to start over.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from medseg.io import atomic_target, atomic_write_text

if TYPE_CHECKING:
    from ignite.engine import Engine

__all__ = ["TrainingCheckpoint", "as_bool"]

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", "none", ""}


def as_bool(value: Any) -> bool:
    """A flag given in a config or on the command line (``true`` / ``false`` arrive as strings)."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _TRUE | _FALSE:
            return text in _TRUE
        raise ValueError(f"not a boolean: {value!r} (use true or false)")
    return bool(value)


def _is_main_process() -> bool:
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _unwrap(network: torch.nn.Module) -> torch.nn.Module:
    inner = getattr(network, "module", None)
    return inner if isinstance(inner, torch.nn.Module) else network


def _randomizables(obj: Any, depth: int = 0) -> list[Any]:
    """Every MONAI ``Randomizable`` reachable from a dataset's transform, in a fixed order."""
    from monai.transforms import Compose, Randomizable

    found: list[Any] = []
    if depth > 4 or obj is None:
        return found
    if isinstance(obj, Compose):
        for t in obj.transforms:
            found += _randomizables(t, depth + 1)
        return found
    if isinstance(obj, Randomizable):
        found.append(obj)
    for value in vars(obj).values() if hasattr(obj, "__dict__") else ():
        if isinstance(value, (Compose, Randomizable)) and value is not obj:
            found += _randomizables(value, depth + 1)
    return found


def _np_state(state: tuple) -> list[Any]:
    name, keys, pos, has_gauss, cached = state
    return [name, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss), float(cached)]


def _np_restore(saved: list[Any]) -> tuple:
    name, keys, pos, has_gauss, cached = saved
    return (name, keys.numpy().astype(np.uint32), pos, has_gauss, cached)


def _saved_key(checkpoint: Any) -> str:
    """The key of Ignite's ``Checkpoint.state_dict()`` that lists the saved files (it changed names)."""
    keys = getattr(checkpoint, "_state_dict_all_req_keys", ("saved",))
    return keys[0] if keys else "saved"


class TrainingCheckpoint:
    """Save the whole training state every ``interval`` epochs; resume from it; keep the best model.

    Args:
        checkpoint_dir: folder of ``filename`` and of the best model's sidecar (the bundle's ``models/``).
        network, optimizer, lr_scheduler: what the trainer trains (a DDP-wrapped network is unwrapped).
        interval: epochs between checkpoints (the last epoch is always saved).
        resume: load ``filename`` at the start of the run when it exists (``"true"`` / ``"false"`` accepted).
        evaluator: the validation evaluator (its best metric is saved and restored).
        best_saver: MONAI ``CheckpointSaver`` that writes the best model (``save_key_metric=True``).
        dataset: the training dataset, whose random transforms' states are saved.
        extra_state: more objects to save and restore by name, those with ``state_dict`` /
            ``load_state_dict`` (e.g. the training-curve handler); others are skipped.
        filename: checkpoint file name.
    """

    def __init__(
        self,
        checkpoint_dir: str | os.PathLike[str],
        network: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        lr_scheduler: Any = None,
        interval: int = 1,
        resume: bool | str = False,
        evaluator: Engine | None = None,
        best_saver: Any = None,
        dataset: Any = None,
        extra_state: Mapping[str, Any] | None = None,
        filename: str = "checkpoint.pt",
    ) -> None:
        if int(interval) < 1:
            raise ValueError(f"interval must be >= 1, got {interval}")
        self.checkpoint_dir = Path(checkpoint_dir)
        self.path = self.checkpoint_dir / filename
        self.network = network
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.interval = int(interval)
        self.resume = as_bool(resume)
        self.evaluator = evaluator
        self.best_saver = best_saver
        self.dataset = dataset
        extra = dict(extra_state or {})
        self.extra_state = {
            k: v for k, v in extra.items() if hasattr(v, "state_dict") and hasattr(v, "load_state_dict")
        }
        self.resumed_from: int | None = None

    @property
    def best_file(self) -> Path:
        name = getattr(self.best_saver, "key_metric_filename", None) or "model.pt"
        return self.checkpoint_dir / f"{Path(name).stem}_key_metric.json"

    def attach(self, engine: Engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch_completed)
        engine.add_event_handler(Events.COMPLETED, self._completed)
        if self.evaluator is not None and self._key_checkpoint() is not None:
            self.evaluator.add_event_handler(Events.COMPLETED, self._record_best)

    # --- best model across runs
    def _key_checkpoint(self) -> Any:
        return getattr(self.best_saver, "_key_metric_checkpoint", None)

    def _record_best(self, _evaluator: Engine) -> None:
        checkpoint = self._key_checkpoint()
        if checkpoint is None or not _is_main_process():
            return
        saved = [[float(p), str(f)] for p, f in checkpoint.state_dict()[_saved_key(checkpoint)]]
        if not saved:
            return
        state = getattr(self.evaluator, "state", None)
        record = {
            "metric": getattr(state, "key_metric_name", None),
            "saved": saved,
            "best_metric": float(saved[-1][0]),
            "best_metric_epoch": int(getattr(state, "best_metric_epoch", -1)),
        }
        if self.best_file.is_file():
            try:
                if json.loads(self.best_file.read_text(encoding="utf-8")) == record:
                    return
            except (OSError, ValueError):
                pass
        atomic_write_text(self.best_file, json.dumps(record, indent=2) + "\n")

    def _restore_best(self) -> None:
        checkpoint = self._key_checkpoint()
        if checkpoint is None or not self.best_file.is_file():
            return
        record = json.loads(self.best_file.read_text(encoding="utf-8"))
        # only entries whose model file is still there count
        saved = [(p, f) for p, f in record.get("saved", []) if (self.checkpoint_dir / f).is_file()]
        if saved:
            checkpoint.load_state_dict({_saved_key(checkpoint): saved})
            if self.evaluator is not None and record.get("best_metric") is not None:
                self.evaluator.state.best_metric = record["best_metric"]
                self.evaluator.state.best_metric_epoch = record.get("best_metric_epoch", -1)

    # --- the training state
    def _transforms(self) -> list[Any]:
        return _randomizables(getattr(self.dataset, "transform", None))

    def state_dict(self, engine: Engine) -> dict[str, Any]:
        """Everything a resumed run needs, in types ``torch.load(weights_only=True)`` reads."""
        state: dict[str, Any] = {
            "network": _unwrap(self.network).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "trainer": {
                "epoch": int(engine.state.epoch),
                "iteration": int(engine.state.iteration),
                "max_epochs": int(engine.state.max_epochs or 0),
            },
            "rng": {
                "torch": torch.get_rng_state(),
                "numpy": _np_state(np.random.get_state()),
                "python": list(random.getstate()[1]) + [random.getstate()[0]],
                "python_gauss": random.getstate()[2],
                "transforms": [_np_state(t.R.get_state()) for t in self._transforms()],
            },
        }
        if self.lr_scheduler is not None:
            state["lr_scheduler"] = self.lr_scheduler.state_dict()
        if self.extra_state:
            state["extra"] = {k: v.state_dict() for k, v in self.extra_state.items()}
        scaler = getattr(engine, "scaler", None)
        if scaler is not None and hasattr(scaler, "state_dict"):
            state["scaler"] = scaler.state_dict()
        if self.evaluator is not None:
            ev = self.evaluator.state
            state["evaluator"] = {
                "best_metric": float(getattr(ev, "best_metric", -1.0)),
                "best_metric_epoch": int(getattr(ev, "best_metric_epoch", -1)),
            }
        return state

    def save(self, engine: Engine) -> None:
        """Write the checkpoint atomically (main process only)."""
        if not _is_main_process():
            return
        state = self.state_dict(engine)
        with atomic_target(self.path) as tmp:
            torch.save(state, tmp)

    def load(self, engine: Engine) -> int:
        """Load the checkpoint into the network, optimizer, scheduler, RNGs and ``engine``; the epoch."""
        state = torch.load(self.path, map_location="cpu", weights_only=True)
        _unwrap(self.network).load_state_dict(state["network"], strict=True)
        self.optimizer.load_state_dict(state["optimizer"])
        if self.lr_scheduler is not None and "lr_scheduler" in state:
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        scaler = getattr(engine, "scaler", None)
        if scaler is not None and "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        np.random.set_state(_np_restore(rng["numpy"]))
        py = rng["python"]
        random.setstate((py[-1], tuple(py[:-1]), rng["python_gauss"]))
        transforms = self._transforms()
        if len(transforms) == len(rng["transforms"]):
            for t, saved in zip(transforms, rng["transforms"], strict=True):
                t.R.set_state(_np_restore(saved))
        for key, saved in state.get("extra", {}).items():
            if key in self.extra_state:
                self.extra_state[key].load_state_dict(saved)
        if self.evaluator is not None and "evaluator" in state:
            self.evaluator.state.best_metric = state["evaluator"]["best_metric"]
            self.evaluator.state.best_metric_epoch = state["evaluator"]["best_metric_epoch"]
        engine.state.epoch = state["trainer"]["epoch"]
        engine.state.iteration = state["trainer"]["iteration"]
        return int(engine.state.epoch)

    # --- events
    def _started(self, engine: Engine) -> None:
        self._restore_best()
        if self.resume and self.path.is_file():
            self.resumed_from = self.load(engine)
            engine.logger.info(
                f"resumed from {self.path}: epoch {engine.state.epoch}, iteration {engine.state.iteration}"
            )
        elif self.resume:
            engine.logger.info(f"resume requested but {self.path} does not exist: starting at epoch 0")

    def _epoch_completed(self, engine: Engine) -> None:
        if engine.state.epoch % self.interval == 0 or engine.state.epoch >= (engine.state.max_epochs or 0):
            self.save(engine)

    def _completed(self, engine: Engine) -> None:
        if engine.state.epoch % self.interval != 0 and engine.state.epoch < (engine.state.max_epochs or 0):
            self.save(engine)
