"""Rank-0 progress bar: loss parts, lr, img/s and ETA (tqdm), plus a plain log line per window."""

from __future__ import annotations

import logging
import sys

from tqdm import tqdm

log = logging.getLogger("retinaflow.train")


class Progress:
    """A tqdm bar over iterations that shows the last logged metrics; silent when not enabled.

    The bar is drawn on a terminal only, at most once a second: where stderr is a file or a pipe (a
    Kubernetes pod's log, CI) the plain log line of each window is the record, not one redrawn bar per
    iteration."""

    def __init__(self, total: int, start: int, enabled: bool = True) -> None:
        self.skipped = 0
        self.bar = (
            tqdm(
                total=total,
                initial=start,
                unit="it",
                dynamic_ncols=True,
                file=sys.stderr,
                disable=None,  # tqdm: off where stderr is not a terminal
                mininterval=1.0,
            )
            if enabled
            else None
        )

    def add_skipped(self, count: int) -> None:
        self.skipped += count

    def update(self, iteration: int, metrics: dict[str, float] | None) -> None:
        if self.bar is None:
            return
        if metrics is not None:
            shown = {k: f"{v:.4g}" for k, v in metrics.items() if k in ("loss", "cls", "box", "lr")}
            shown["img/s"] = f"{metrics.get('img_s', 0.0):.1f}"
            if self.skipped:
                shown["skipped"] = str(self.skipped)
            self.bar.set_postfix(shown, refresh=False)
            log.info("iter %d %s", iteration, " ".join(f"{k}={v}" for k, v in shown.items()))
        self.bar.update(iteration - self.bar.n)  # redraws once mininterval has passed

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
