"""The training loop: small, batched, resumable; everything else plugs in through callbacks.

Launch with ``torchrun --nproc_per_node N -m retinaflow train ...`` for DDP (any number of GPUs and
nodes) or as a single process. ``config.train.batch`` is the global batch, split over ranks.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from retinaflow.config import Config
from retinaflow.data.batch import Batch
from retinaflow.engine import distributed as D
from retinaflow.engine.callbacks import Callback, CallbackList, EvalResult, TrainState
from retinaflow.engine.checkpoint import (
    check_arch,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from retinaflow.engine.ema import EMA
from retinaflow.engine.optim import build_optimizer
from retinaflow.engine.progress import Progress
from retinaflow.engine.schedule import autocast_dtype, lr_at
from retinaflow.errors import CheckpointError, ConfigError, DataError, TrainingDiverged, TrainingInterrupted
from retinaflow.model.anchors import generate_anchors
from retinaflow.model.loss import detection_loss
from retinaflow.model.norm import resolve_norms
from retinaflow.model.retinanet import RetinaNet, build_model

log = logging.getLogger(__name__)


def train(config: Config, checkpoint: str | Path, callbacks: list[Callback] | None = None) -> Path:
    """Train (or resume training of) the detector described by ``config``; returns the checkpoint path.

    If ``checkpoint`` exists it is resumed exactly (weights, optimizer, scaler, iteration, RNG and data
    position); otherwise training starts from scratch, from backbone weights, or from
    ``config.train.fine_tune`` (a checkpoint whose class count may differ).
    """
    _check_config(config)
    info = D.init_distributed()
    try:
        return _Trainer(config, Path(checkpoint), CallbackList(callbacks), info).run()
    except (TrainingInterrupted, TrainingDiverged):  # raised by every rank at once (D.any_rank)
        D.leave_together(info)
        raise
    finally:
        D.shutdown(info)


def _check_config(config: Config) -> None:
    t, d = config.train, config.data
    if not d.images or not d.annotations:
        raise ConfigError("training needs --images and --annotations")
    if t.iters <= 0 or t.batch <= 0:
        raise ConfigError("--iters and --batch must be positive")
    if t.lr <= 0:
        raise ConfigError("--lr must be positive")
    if bool(d.val_images) != bool(d.val_annotations):
        raise ConfigError("give both --val-images and --val-annotations, or neither")


class _Trainer:
    def __init__(self, config: Config, path: Path, callbacks: CallbackList, info: D.DistInfo) -> None:
        self.config, self.path, self.callbacks, self.info = config, path, callbacks, info
        self.stop_requested = False

    # -- set-up -------------------------------------------------------------------------------
    def _build(self) -> None:
        from retinaflow.data.select import build_train
        from retinaflow.data.shapes import use_cudnn_benchmark

        cfg, info = self.config, self.info
        if cfg.train.batch % info.world_size:
            raise ConfigError(f"--batch {cfg.train.batch} is not divisible by the {info.world_size} ranks")
        self.resume_state = load_checkpoint(self.path) if self.path.exists() else None
        start = int(self.resume_state["iteration"]) if self.resume_state else 0
        if self.resume_state and info.is_main:
            D.warn_if_world_changed(self.resume_state.get("world_size"), info, cfg.train.batch, self.path)
        _seed_everything(cfg.train.seed + info.rank)
        loader, dataset = build_train(
            cfg.data,
            cfg.train.batch // info.world_size,
            cfg.train.seed,
            info.rank,
            info.world_size,
            start,
            info.device,
        )
        self.loader, self.dataset = loader, dataset
        cfg.class_names = list(dataset.class_names)
        cfg.model.num_classes = len(cfg.class_names)
        self.category_ids = list(dataset.category_ids)

        weights = None if (self.resume_state or cfg.train.fine_tune) else cfg.train.backbone_weights
        # From the config, not from ``weights``: a resumed run must build the network it saved.
        pretrained = bool(cfg.train.backbone_weights or cfg.train.fine_tune)
        cfg.model = resolve_norms(cfg.model, pretrained)
        model = build_model(cfg.model, backbone_weights=weights)
        if self.resume_state:
            check_arch(self.resume_state["arch"], model.arch, self.path)
            saved = list(self.resume_state.get("class_names") or [])
            if saved and saved != cfg.class_names:
                raise CheckpointError(
                    f"checkpoint {self.path} was trained on classes {saved}, but the annotations define "
                    f"{cfg.class_names}: use --fine-tune to start from it on other classes"
                )
            model.load_state_dict(self.resume_state["model"])
        elif cfg.train.fine_tune:
            _load_for_fine_tune(model, cfg.train.fine_tune)
        if cfg.model.norm == "sync_bn" and info.distributed:
            nn.SyncBatchNorm.convert_sync_batchnorm(model)  # swaps the BN children in place
        model.to(info.device)
        if info.device.type == "cuda":
            torch.backends.cudnn.benchmark = use_cudnn_benchmark(cfg.train.cudnn_benchmark, loader.policy)
        if cfg.train.channels_last:
            model.to(memory_format=torch.channels_last)
        self.model = model
        self.ddp: nn.Module = model
        if info.distributed:
            ids = [info.device.index] if info.device.type == "cuda" else None
            self.ddp = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        if cfg.train.compile:
            self.ddp = torch.compile(self.ddp, backend=cfg.train.compile)  # type: ignore[assignment]

        t = cfg.train
        self.optimizer = build_optimizer(model.parameters(), t)
        self.amp_dtype = autocast_dtype(t.precision, info.device)
        self.scaler = torch.amp.GradScaler(info.device.type, enabled=self.amp_dtype == torch.float16)
        self.iteration = start
        self.ema = EMA(model, t.ema) if t.ema > 0 else None
        if self.resume_state:
            if self.ema is not None and self.resume_state.get("ema"):
                self.ema.load_state_dict(self.resume_state["ema"])
            self.optimizer.load_state_dict(self.resume_state["optimizer"])
            if self.resume_state.get("scaler"):
                self.scaler.load_state_dict(self.resume_state["scaler"])
            set_rng_state(self.resume_state["rng"])
        self.state = TrainState(
            config=cfg, output=self.path.parent, iteration=start, total_iters=t.iters, resumed=start > 0
        )

    # -- checkpointing ------------------------------------------------------------------------
    def save(self) -> Path:
        if self.info.is_main:
            save_checkpoint(
                self.path,
                {
                    "arch": self.model.arch,
                    "model": self.model.state_dict(),
                    "optimizer": self.optimizer.state_dict(),
                    "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
                    "ema": self.ema.state_dict() if self.ema is not None else None,
                    "iteration": self.iteration,
                    "world_size": self.info.world_size,
                    "rng": rng_state(),
                    "config": self.config.to_dict(),
                    "class_names": list(self.config.class_names),
                    "category_ids": self.category_ids,
                },
            )
            self.callbacks.on_checkpoint(self.state, self.path)
        D.barrier(self.info)
        return self.path

    # -- one step -----------------------------------------------------------------------------
    def step(self, batch: Batch) -> dict[str, torch.Tensor]:
        cfg, dev = self.config, self.info.device
        batch = batch.to(dev)
        images = batch.images
        if cfg.train.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        lr = lr_at(self.iteration, cfg.train)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        autocast = (
            torch.autocast(dev.type, dtype=self.amp_dtype) if self.amp_dtype is not None else nullcontext()
        )
        with autocast:
            cls_out, box_out = self.ddp(images)
        anchors = generate_anchors(
            cfg.model.anchors, (images.shape[-2], images.shape[-1]), dev, torch.float32
        )
        # Under DDP, normalise by the mean foreground count over ranks: DDP averages gradients, so the
        # result equals one process training on the whole global batch.
        norm = self._global_fg if self.info.distributed else None
        losses = detection_loss(
            cls_out, box_out, anchors, batch.boxes, batch.labels, cfg.loss, cfg.matcher, norm
        )
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(losses["loss"]).backward()
        if cfg.train.clip_grad > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.train.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.ema is not None:
            self.ema.update(self.model)
        losses["lr"] = torch.tensor(lr)
        return losses

    def _global_fg(self, local: torch.Tensor) -> torch.Tensor:
        return D.all_reduce_sum(local.detach().clone(), self.info) / self.info.world_size

    # -- the loop -----------------------------------------------------------------------------
    def run(self) -> Path:
        self._build()
        cfg, info, t = self.config, self.info, self.config.train
        if self.iteration >= t.iters:
            log.info("checkpoint %s already holds %d iterations; nothing to do", self.path, self.iteration)
            return self.path
        restore = _install_stop_handlers(self)
        self.model.train()
        if info.is_main:
            self.callbacks.on_train_start(self.state)
        progress = Progress(t.iters, self.iteration, enabled=info.is_main)
        batches: Iterator[Batch] = iter(self.loader)
        window_start, window_images = time.perf_counter(), 0
        try:
            while self.iteration < t.iters:
                batch = next(batches)
                losses = self.step(batch)
                loss_value = float(losses["loss"].detach())
                diverged, stop = D.any_rank((not math.isfinite(loss_value), self.stop_requested), info)
                if diverged:
                    raise TrainingDiverged(
                        f"loss became non-finite at iteration {self.iteration + 1}; stopped, the last good "
                        f"checkpoint is kept at {self.path}; {_divergence_hint(cfg)}"
                    )
                self.iteration += 1
                self.state.iteration = self.iteration
                window_images += len(batch) * info.world_size
                skipped = getattr(batch, "skipped", None)
                if skipped:
                    progress.add_skipped(len(skipped) if hasattr(skipped, "__len__") else int(skipped))
                if self.iteration % t.log_every == 0 or self.iteration == t.iters:
                    elapsed = time.perf_counter() - window_start
                    metrics = {k: float(v.detach()) for k, v in losses.items()}
                    metrics["img_s"] = window_images / max(elapsed, 1e-9)
                    progress.update(self.iteration, metrics)
                    if info.is_main:
                        self.callbacks.on_step(self.state, metrics)
                    window_start, window_images = time.perf_counter(), 0
                else:
                    progress.update(self.iteration, None)
                if stop:
                    self.save()
                    raise TrainingInterrupted(
                        f"interrupted at iteration {self.iteration}; checkpoint saved to {self.path}, "
                        "run the same command to resume"
                    )
                if (
                    t.checkpoint_every
                    and self.iteration % t.checkpoint_every == 0
                    and self.iteration < t.iters
                ):
                    self.save()
                if t.val_every and self.iteration % t.val_every == 0 and self.iteration < t.iters:
                    self.validate()
            self.save()
            if cfg.data.val_images:
                self.validate()
            progress.close()
            if info.is_main:
                self.callbacks.on_train_end(self.state, self.path)
            return self.path
        except BaseException as exc:
            progress.close()
            if info.is_main:
                self.callbacks.on_error(self.state, exc)
            raise
        finally:
            restore()

    def validate(self) -> EvalResult | None:
        """Detect on the validation set (sharded over ranks), evaluate on rank 0, notify sinks."""
        from retinaflow.data.select import build_eval
        from retinaflow.engine.evaluate import evaluate
        from retinaflow.engine.infer import predict

        cfg = self.config
        assert cfg.data.val_images and cfg.data.val_annotations
        loader, _ = build_eval(
            cfg.data.val_images,
            cfg.data.val_annotations,
            dataclasses.replace(cfg.data, pad_stride=cfg.infer.pad_stride),
            cfg.infer.batch,
            self.info.rank,
            self.info.world_size,
            self.info.device,
        )
        network = self.ema.module if self.ema is not None else self.model
        assert isinstance(network, RetinaNet)
        dets = predict(network, loader, cfg, self.info.device, self.amp_dtype, self.category_ids)
        gathered = D.gather_to_main(dets, self.info)
        result = None
        if self.info.is_main and gathered is not None:
            merged = [d for part in gathered for d in part]
            result = evaluate(cfg.data.val_annotations, merged, list(cfg.class_names))
            log.info("iteration %d: validation mAP %.4f", self.iteration, result.map)
            self.state.extra["last_map"] = result.map
            self.callbacks.on_validation(self.state, result)
        self.model.train()
        D.barrier(self.info)
        return result


def _divergence_hint(cfg: Config) -> str:
    """What to try after a non-finite loss, for this config."""
    if cfg.model.norm == "frozen_bn" and not (cfg.train.backbone_weights or cfg.train.fine_tune):
        return (
            "the backbone starts from random init with frozen batch norm (no normalisation at all): "
            "use --set model.norm=gn model.head_norm=gn (the default without weights), or --backbone-weights"
        )
    tips = "lower --lr, a longer train.warmup"
    if cfg.train.clip_grad <= 0:
        tips += ", --set train.clip_grad=10"
    if cfg.model.head_norm == "none":
        tips += ", or --set model.head_norm=gn"
    return f"try {tips}"


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def _load_for_fine_tune(model: RetinaNet, path: str) -> None:
    """Copy every tensor of ``path`` whose name and shape fit ``model`` (new class count: new cls output)."""
    src = load_checkpoint(path)["model"]
    own = model.state_dict()
    fitting = {k: v for k, v in src.items() if k in own and own[k].shape == v.shape}
    if not fitting:
        raise DataError(f"fine-tune checkpoint {path} shares no weights with this model")
    model.load_state_dict(fitting, strict=False)
    log.info("fine-tuning from %s: %d/%d tensors loaded", path, len(fitting), len(own))


def _install_stop_handlers(trainer: _Trainer) -> Any:
    """SIGTERM/SIGINT ask the loop to checkpoint and stop at the end of the current iteration."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(signum: int, frame: Any) -> None:
        if trainer.stop_requested:  # second signal: give up at once
            raise KeyboardInterrupt
        trainer.stop_requested = True

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}

    def restore() -> None:
        for s, h in previous.items():
            signal.signal(s, h)

    return restore
