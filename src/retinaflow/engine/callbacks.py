"""The sink protocol through which training reports progress, metrics and artifacts.

The training loop knows nothing of MLflow, progress bars or files beyond its checkpoint: it calls
these hooks, and the CLI / components plug in whatever sinks they want (``retinaflow.mlops.tracking``
provides the MLflow one). Hooks run on rank 0 only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from retinaflow.config import Config


@dataclass
class TrainState:
    """What a sink may read about the run in progress."""

    config: Config
    output: Path
    iteration: int = 0
    total_iters: int = 0
    resumed: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class EvalResult:
    """COCO evaluation outcome.

    ``stats`` holds the 12 COCOeval summary numbers by name (``AP``, ``AP50``, ``AP75``, ``APs``,
    ``APm``, ``APl``, ``AR1``, ``AR10``, ``AR100``, ``ARs``, ``ARm``, ``ARl``); ``per_class`` maps class
    name to AP@[.5:.95]; ``precision`` is COCOeval's raw ``eval['precision']`` array (T,R,K,A,M)
    when available, for plots.
    """

    stats: dict[str, float]
    per_class: dict[str, float]
    num_images: int = 0
    num_detections: int = 0
    precision: Any = None

    @property
    def map(self) -> float:
        return self.stats.get("AP", 0.0)


class Callback:
    """Base sink: override the hooks you need. All hooks are no-ops by default."""

    def on_train_start(self, state: TrainState) -> None:
        """Before the first iteration (also after a resume; ``state.resumed`` tells)."""

    def on_step(self, state: TrainState, metrics: dict[str, float]) -> None:
        """Every ``train.log_every`` iterations: loss parts, lr, img/s."""

    def on_validation(self, state: TrainState, result: EvalResult) -> None:
        """After each validation pass."""

    def on_checkpoint(self, state: TrainState, path: Path) -> None:
        """After a checkpoint file has been atomically written."""

    def on_train_end(self, state: TrainState, path: Path) -> None:
        """After the final checkpoint; ``path`` is that checkpoint."""

    def on_error(self, state: TrainState, error: BaseException) -> None:
        """When training stops with an exception (divergence, interruption)."""


class CallbackList(Callback):
    """Fans every hook out to several sinks, in order."""

    def __init__(self, callbacks: list[Callback] | None = None) -> None:
        self.callbacks = list(callbacks or [])

    def on_train_start(self, state: TrainState) -> None:
        for cb in self.callbacks:
            cb.on_train_start(state)

    def on_step(self, state: TrainState, metrics: dict[str, float]) -> None:
        for cb in self.callbacks:
            cb.on_step(state, metrics)

    def on_validation(self, state: TrainState, result: EvalResult) -> None:
        for cb in self.callbacks:
            cb.on_validation(state, result)

    def on_checkpoint(self, state: TrainState, path: Path) -> None:
        for cb in self.callbacks:
            cb.on_checkpoint(state, path)

    def on_train_end(self, state: TrainState, path: Path) -> None:
        for cb in self.callbacks:
            cb.on_train_end(state, path)

    def on_error(self, state: TrainState, error: BaseException) -> None:
        for cb in self.callbacks:
            cb.on_error(state, error)
