"""What a compiled training keeps between runs: the compiler's artifacts in ``train.compile_cache``
(:mod:`retinaflow.engine.compile_cache`) and, with ``train.compile_package``, this device's packaged
forward in the same file (:mod:`retinaflow.engine.compile_package`).

The trainer calls, in order::

    store = CompileStore(config.train, info, net, autocast)
    forward = store.start(forward)          # set-up: loads the file; the package if it holds one that loads
    forward = store.first_step(x, forward)  # each step (work only at the first): packages the forward on x
    store.save()                            # every rank, after the first step and at each checkpoint
    store.report()                          # after the loop: batches through the package / the fallback
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn

from retinaflow.config import TrainConfig
from retinaflow.engine import compile_cache, compile_package
from retinaflow.engine import distributed as D
from retinaflow.engine.schedule import autocast_dtype
from retinaflow.errors import first_line

log = logging.getLogger(__name__)

Forward = Callable[..., Any]


class CompileStore:
    """``train.compile_cache`` and ``train.compile_package`` of one rank.

    net:      the network the step's forward runs (unwrapped: what a package is traced from).
    autocast: a factory of the training step's autocast context (a package is loaded and traced in it).
    """

    def __init__(
        self,
        train: TrainConfig,
        info: D.DistInfo,
        net: nn.Module,
        autocast: Callable[[], AbstractContextManager[Any]],
    ) -> None:
        self.train, self.info, self.net, self.autocast = train, info, net, autocast
        self.package: compile_package.PackagedForward | None = None
        self.want_package = False  # no package loaded: the first step compiles one
        self.package_unsaved = False  # compiled in this run: saved to the file after the step
        self.cached_graphs = 0

    def start(self, forward: Forward) -> Forward:
        """Load the file's artifacts for this device and, with ``compile_package``, its package: returns what
        the step should call (the package, falling back to ``forward``; or ``forward`` itself)."""
        t = self.train
        if t.compile_cache:
            compile_cache.load(t.compile_cache, self.info.device)
        if t.compile_package:
            forward = self._load_package(forward)
        self.cached_graphs = compile_cache.compiled_graphs()  # what the cache file already holds
        return forward

    def _load_package(self, forward: Forward) -> Forward:
        t, key = self.train, compile_cache.package_key(self.info.device)
        blob = compile_cache.load_package(t.compile_cache, self.info.device)
        if blob is None:
            log.info("compile package: none for %s in %s; compiled at the first step", key, t.compile_cache)
            self.want_package = True
            return forward
        start = time.perf_counter()
        try:
            fn = compile_package.load(blob, self._fingerprint(), self.autocast())
        except Exception as exc:  # another torch, a torn file: compiled as without it, and rebuilt
            log.warning("compile package: cannot load %s (%s); compiling it again", key, first_line(exc))
            self.want_package = True
            return forward
        self.package = compile_package.PackagedForward(fn, self.net, forward)
        log.info(
            "compile package: %s loaded from %s (%.1f MB) in %.1f s",
            *(key, t.compile_cache, len(blob) / 2**20, time.perf_counter() - start),
        )
        return self.package

    def first_step(self, example: torch.Tensor, forward: Forward) -> Forward:
        """At the first step of a run that loaded no package: compile the forward ahead of time, traced on
        ``example`` (the step's input), and return it to train through. If PyTorch cannot, the step goes on
        through ``forward`` (the lazily compiled network). Otherwise returns ``forward``."""
        if not self.want_package:
            return forward
        self.want_package = False
        start = time.perf_counter()
        try:
            fn = compile_package.compile_forward(self.net, example, self.train.compile, self.autocast())
        except Exception as exc:  # this torch cannot package this network: train on without it
            log.warning("compile package: cannot compile one (%s); later starts trace again", first_line(exc))
            return forward
        self.package = compile_package.PackagedForward(fn, self.net, forward)
        self.package_unsaved = True
        log.info("compile package: compiled in %.1f s", time.perf_counter() - start)
        return self.package

    def save(self) -> None:
        """Every rank: if any rank compiled something new (its device missed the file, new shapes) or built
        its package, rewrite ``compile_cache`` with every device's."""
        if not self.train.compile_cache:
            return
        package = self._package_bytes()
        new = float(compile_cache.compiled_graphs() > self.cached_graphs or package is not None)
        if D.all_reduce_sum(torch.tensor([new], device=self.info.device), self.info).item() > 0:
            compile_cache.save(self.train.compile_cache, self.info, package)
            self.cached_graphs = compile_cache.compiled_graphs()

    def report(self) -> None:
        """Log how many batches ran through the package and how many through the compiled network."""
        if self.package is not None:
            counts = self.package.hits, self.package.fallbacks
            log.info("compile package: %d batches ran through it, %d through the compiled network", *counts)

    def _package_bytes(self) -> bytes | None:
        """The package this run compiled, serialised once for the file (None: nothing new)."""
        if not self.package_unsaved or self.package is None:
            return None
        self.package_unsaved = False
        try:
            blob = compile_package.serialize(self.package.package, self._fingerprint())
        except Exception as exc:  # a backend whose output does not serialise
            log.warning("compile package: cannot save it (%s); later starts trace again", first_line(exc))
            return None
        log.info("compile package: %.1f MB, saved with the compile cache", len(blob) / 2**20)
        return blob

    def _fingerprint(self) -> str:
        dtype = autocast_dtype(self.train.precision, self.info.device)
        return compile_package.fingerprint(self.net, self.train.compile, dtype)
