"""The training loop: small, batched, resumable; everything else plugs in through callbacks.

Launch with ``torchrun --nproc_per_node N -m retinaflow train ...`` for DDP (any number of GPUs and
nodes) or as a single process. ``config.train.batch`` is the global batch, split over ranks.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from retinaflow.config import Config
from retinaflow.data.batch import Batch
from retinaflow.engine import compile_cache
from retinaflow.engine import distributed as D
from retinaflow.engine.blocks import BlockInput, to_blocks
from retinaflow.engine.callbacks import Callback, CallbackList, EvalResult, TrainState
from retinaflow.engine.checkpoint import (
    check_arch,
    load_checkpoint,
    remove_orphan_temps,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from retinaflow.engine.compile_store import CompileStore
from retinaflow.engine.ema import EMA
from retinaflow.engine.grad_sync import compiled, grad_sync_of, keep_ranks_in_step, symbolic_sizes
from retinaflow.engine.optim import build_optimizer
from retinaflow.engine.progress import Progress
from retinaflow.engine.schedule import autocast_dtype, lr_at
from retinaflow.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    TrainingDiverged,
    TrainingInterrupted,
)
from retinaflow.model.anchors import generate_anchors
from retinaflow.model.loss import detection_loss
from retinaflow.model.norm import resolve_norms
from retinaflow.model.retinanet import RetinaNet, build_model

log = logging.getLogger(__name__)

_NONE = torch.iinfo(torch.int64).max  # "no non-finite loss yet" in the device-side first-bad-iteration flag


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
    except (TrainingInterrupted, TrainingDiverged):  # raised by every rank at once (_Trainer._agree)
        D.leave_together(info)
        raise
    finally:
        D.shutdown(info)


def _check_config(config: Config) -> None:
    """What only training needs (value ranges are checked by the config dataclasses themselves)."""
    d = config.data
    if not d.images or not d.annotations:
        raise ConfigError("training needs --images and --annotations")
    if bool(d.val_images) != bool(d.val_annotations):
        raise ConfigError("give both --val-images and --val-annotations, or neither")
    if config.train.cuda_graph and config.train.compile != "inductor":
        raise ConfigError(
            "train.cuda_graph replays inductor's compiled code: add --compile (inductor) or drop --cuda-graph"
        )
    if config.train.compile and config.train.compile_shapes == "static" and d.shapes != "buckets":
        raise ConfigError(
            "train.compile_shapes=static compiles each padded shape: it needs data.shapes=buckets (a bounded "
            f"set of shapes), got data.shapes={d.shapes}"
        )
    t = config.train
    if t.compile_package and not (t.compile and t.compile_cache):
        raise ConfigError(
            "train.compile_package keeps its package in the compile cache: add --compile --compile-cache FILE"
        )
    if t.compile_package and (t.cuda_graph or t.compile_shapes == "static"):
        raise ConfigError(
            "train.compile_package packages one graph without CUDA graphs: drop --cuda-graph or "
            "--compile-shapes static, or the package"
        )
    if config.train.compile_cache and Path(config.train.compile_cache).is_dir():
        raise ConfigError(
            f"train.compile_cache names a directory ({config.train.compile_cache}): give a file in it, "
            "e.g. --compile-cache DIR/retinaflow.bin"
        )


class _Trainer:
    def __init__(self, config: Config, path: Path, callbacks: CallbackList, info: D.DistInfo) -> None:
        self.config, self.path, self.callbacks, self.info = config, path, callbacks, info
        self.stop_requested = False
        self.lr = 0.0
        # First iteration whose loss was non-finite on this rank (_NONE: none yet). Kept on the device so
        # the loop never waits for the GPU just to look at the loss; read at the check points only.
        self.first_bad = torch.full((), _NONE, dtype=torch.int64, device=info.device)
        self.fg_mean = D.LaggedMean(info) if info.distributed else None

    # -- set-up -------------------------------------------------------------------------------
    def _build(self) -> None:
        cfg, info = self.config, self.info
        if cfg.train.batch % info.world_size:
            raise ConfigError(f"--batch {cfg.train.batch} is not divisible by the {info.world_size} ranks")
        if info.is_main:  # only rank 0 writes the checkpoint, so only it can have left a torn write
            remove_orphan_temps(self.path)
        self.resume_state = load_checkpoint(self.path) if self.path.exists() else None
        self.iteration = int(self.resume_state["iteration"]) if self.resume_state else 0
        if self.resume_state and info.is_main:
            D.warn_if_world_changed(self.resume_state.get("world_size"), info, cfg.train.batch, self.path)
            _say_resume_changes(self.resume_state.get("config") or {}, cfg, self.path)
        _seed_everything(cfg.train.seed + info.rank)
        self._build_data()
        self._build_model()
        self._build_optimizer()
        if info.distributed and info.is_main:  # once: what every pod's log of a multi-GPU job should show
            how, why = grad_sync_of(self.model, cfg.train, info)
            log.info(
                "%d ranks (%s, %s): global batch %d, %d per rank; gradients averaged %s (%s)",
                info.world_size, info.device.type, torch.distributed.get_backend(), cfg.train.batch,
                cfg.train.batch // info.world_size, "by DDP" if how == "ddp" else "after backward", why,
            )  # fmt: skip
        self.state = TrainState(
            config=cfg, output=self.path.parent, iteration=self.iteration, total_iters=cfg.train.iters,
            resumed=self.iteration > 0,
        )  # fmt: skip

    def _build_data(self) -> None:
        """The training loader, positioned at ``self.iteration``; the class names come from its dataset."""
        from retinaflow.data.select import build_train

        cfg, info = self.config, self.info
        per_rank = cfg.train.batch // info.world_size
        self.loader, dataset = build_train(
            cfg.data, per_rank, cfg.train.seed, info.rank, info.world_size, self.iteration, info.device
        )
        cfg.class_names = list(dataset.class_names)
        cfg.model.num_classes = len(cfg.class_names)
        self.category_ids = list(dataset.category_ids)

    def _build_model(self) -> None:
        """The network with its saved, fine-tune or backbone weights, on the device, DDP/compile-wrapped."""
        from retinaflow.data.shapes import use_cudnn_benchmark

        cfg, info, resume = self.config, self.info, self.resume_state
        weights = None if (resume or cfg.train.fine_tune) else cfg.train.backbone_weights
        # From the config, not from ``weights``: a resumed run must build the network it saved.
        cfg.model = resolve_norms(cfg.model, bool(cfg.train.backbone_weights or cfg.train.fine_tune))
        model = build_model(cfg.model, backbone_weights=weights)
        if resume:
            self._check_resumable(model)
            model.load_state_dict(resume["model"])
        elif cfg.train.fine_tune:
            _load_for_fine_tune(model, cfg.train.fine_tune)
        if cfg.model.norm == "sync_bn" and info.distributed:
            nn.SyncBatchNorm.convert_sync_batchnorm(model)  # swaps the BN children in place
        model.to(info.device)
        if info.device.type == "cuda":
            benchmark = use_cudnn_benchmark(cfg.train.cudnn_benchmark, self.loader.policy)
            torch.backends.cudnn.benchmark = benchmark
        if cfg.train.channels_last:
            model.to(memory_format=torch.channels_last)
        self.model = model
        # Batches of several padded shapes (buckets, or stride padding): by default compile once with
        # symbolic height and width instead of once for the first shape and again, dynamic, for the
        # second; train.compile_shapes=blocks makes them symbolic multiples of the pad stride (the network
        # gets the batch in blocks, engine/blocks.py), static compiles each bucket.
        policy, t = self.loader.policy, cfg.train
        static = t.compile_shapes == "static"
        shapes = len(policy.buckets) if policy is not None and policy.buckets else None  # None: unbounded
        self.dynamic_hw = bool(t.compile) and symbolic_sizes(shapes, static)
        stride = policy.stride if policy is not None else 1
        self.block = stride if self.dynamic_hw and t.compile_shapes == "blocks" and stride > 1 else 0
        net = BlockInput(model, self.block) if self.block else model
        # what step() calls (the model, DDP-wrapped and/or compiled) and, without DDP, the gradient average
        forward_net, self.grad_average = keep_ranks_in_step(net, cfg.train, info)
        self.forward_net: Callable[..., Any] = forward_net
        if t.compile_package and isinstance(forward_net, nn.parallel.DistributedDataParallel):
            raise ConfigError(
                "train.compile_package cannot package a DDP-wrapped network: use --set "
                "train.grad_sync=after_backward (one node), or drop the package"
            )
        # the compile-cache file and the packaged forward (engine/compile_store.py)
        self.store = CompileStore(t, info, net, self._autocast) if t.compile else None
        if self.store is not None:
            self.forward_net = compiled(forward_net, t.compile, info, t.cuda_graph, shapes, static)
            self.forward_net = self.store.start(self.forward_net)

    def _check_resumable(self, model: RetinaNet) -> None:
        """The checkpoint being resumed holds this architecture, trained on these classes with this optimizer
        (its state cannot move to another one)."""
        assert self.resume_state is not None
        check_arch(self.resume_state["arch"], model.arch, self.path)
        train_saved = (self.resume_state.get("config") or {}).get("train") or {}
        optimizer = train_saved.get("optimizer", "sgd")  # checkpoints from before the key: SGD
        if optimizer != self.config.train.optimizer:
            raise CheckpointError(
                f"checkpoint {self.path} was trained with train.optimizer={optimizer}, this run asks for "
                f"{self.config.train.optimizer}: resume it with --set train.optimizer={optimizer} (its "
                "optimizer state fits no other), or start a new run from its weights with --fine-tune"
            )
        saved = list(self.resume_state.get("class_names") or [])
        if saved and saved != self.config.class_names:
            raise CheckpointError(
                f"checkpoint {self.path} was trained on classes {saved}, but the annotations define "
                f"{self.config.class_names}: use --fine-tune to start from it on other classes"
            )

    def _build_optimizer(self) -> None:
        """Optimizer, loss scaler, EMA, RNG and the DDP loss normaliser, restored when resuming."""
        t, dev, resume = self.config.train, self.info.device, self.resume_state
        self.optimizer = build_optimizer(self.model.parameters(), t)
        self.amp_dtype = autocast_dtype(t.precision, dev)
        self.scaler = torch.amp.GradScaler(dev.type, enabled=self.amp_dtype == torch.float16)
        self.ema = EMA(self.model, t.ema) if t.ema > 0 else None
        if resume:
            if self.ema is not None and resume.get("ema"):
                self.ema.load_state_dict(resume["ema"])
            self.optimizer.load_state_dict(resume["optimizer"])
            if resume.get("scaler"):
                self.scaler.load_state_dict(resume["scaler"])
            set_rng_state(resume["rng"])
            if self.fg_mean is not None and resume.get("fg_mean") is not None:
                self.fg_mean.previous = resume["fg_mean"].to(dev)  # the next step's normaliser, as saved

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
                    # the loss normaliser the next step uses (D.LaggedMean): kept for an exact resume
                    "fg_mean": self.fg_mean.saved() if self.fg_mean is not None else None,
                    "config": self.config.to_dict(),
                    "class_names": list(self.config.class_names),
                    "category_ids": self.category_ids,
                },
            )
            self.callbacks.on_checkpoint(self.state, self.path)
        if self.store is not None:
            self.store.save()
        D.barrier(self.info)
        return self.path

    def _autocast(self) -> Any:
        """The training step's autocast context (none in fp32)."""
        dev = self.info.device
        dtype = autocast_dtype(self.config.train.precision, dev)  # before _build_optimizer sets amp_dtype
        return torch.autocast(dev.type, dtype=dtype) if dtype is not None else nullcontext()

    # -- one step -----------------------------------------------------------------------------
    def step(self, batch: Batch) -> dict[str, torch.Tensor]:
        """One optimizer step on ``batch``; returns the loss parts (0-dim device tensors), not synced."""
        cfg, dev = self.config, self.info.device
        batch = batch.to(dev)
        images = batch.images
        if cfg.train.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        net_input = images
        if self.block:
            net_input = to_blocks(images, self.block)  # marked dynamic in its block counts
        elif self.dynamic_hw:
            torch._dynamo.maybe_mark_dynamic(images, 2)
            torch._dynamo.maybe_mark_dynamic(images, 3)
        self.lr = lr_at(self.iteration, cfg.train)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr
        if self.store is not None:  # the first step packages the forward, traced on its input
            self.forward_net = self.store.first_step(net_input, self.forward_net)
        with self._autocast():
            cls_out, box_out = self.forward_net(net_input)
        anchors = generate_anchors(
            cfg.model.anchors, (images.shape[-2], images.shape[-1]), dev, torch.float32
        )
        # On several ranks, normalise by the mean foreground count over ranks: the gradients are averaged
        # (train.grad_sync), so the result equals one process training on the whole global batch. The
        # mean is all-reduced while the step goes on and applied after backward (D.LaggedMean), so ranks
        # do not wait mid-step.
        losses = detection_loss(
            cls_out, box_out, anchors, batch.boxes, batch.labels, cfg.loss, cfg.matcher, self.fg_mean
        )
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(losses["loss"]).backward()
        if self.grad_average is not None:
            self.grad_average()
        factor = self.fg_mean.correction() if self.fg_mean is not None else None
        if factor is not None:
            torch._foreach_mul_([p.grad for p in self.model.parameters() if p.grad is not None], factor)
            losses = {name: value * factor for name, value in losses.items()}
        if cfg.train.clip_grad > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.train.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.ema is not None:
            self.ema.update(self.model)
        return losses

    # -- the loop -----------------------------------------------------------------------------
    def run(self) -> Path:
        """Build, then train to ``train.iters``; sinks hear of the start, the end or the error."""
        self._build()
        if self.iteration >= self.config.train.iters:
            log.info("checkpoint %s already holds %d iterations; nothing to do", self.path, self.iteration)
            return self.path
        restore = _install_stop_handlers(self)
        self.model.train()
        if self.info.is_main:
            self.callbacks.on_train_start(self.state)
        progress = Progress(self.config.train.iters, self.iteration, enabled=self.info.is_main)
        try:
            self._loop(progress)
            if self.store is not None:
                self.store.report()
            self.save()
            if self.config.data.val_images:
                self.validate()
            progress.close()
            if self.info.is_main:
                self.callbacks.on_train_end(self.state, self.path)
            return self.path
        except BaseException as exc:
            progress.close()
            if self.info.is_main:
                self.callbacks.on_error(self.state, exc)
            raise
        finally:
            restore()

    def _loop(self, progress: Progress) -> None:
        """Step until ``train.iters``, checking the ranks' flags only where a decision needs them.

        Between check points nothing waits for the device: the loss stays on it (``first_bad`` records a
        non-finite one), so the CPU queues the next step while the GPU runs this one. The check points
        are the log steps, every checkpoint and validation, and the last iteration; there every rank
        learns, from one all-reduce, whether any rank saw a non-finite loss (then all raise
        :class:`TrainingDiverged` before writing anything) or was asked to stop (then all stop at this
        same iteration, with one checkpoint). A stop request therefore waits at most ``train.log_every``
        iterations.
        """
        t = self.config.train
        batches: Iterator[Batch] = iter(self.loader)
        window_start, window_images = time.perf_counter(), 0
        first = True
        while self.iteration < t.iters:
            batch = next(batches)
            losses = self.step(batch)
            if first and self.store is not None:  # compiled now: keep it even if this run stops early
                if self.info.is_main:
                    elapsed = time.perf_counter() - window_start
                    log.info("compile: first step %.1f s; %s", elapsed, compile_cache.outcome())
                self.store.save()
            first = False
            bad_here = torch.where(torch.isfinite(losses["loss"].detach()), _NONE, self.iteration + 1)
            self.first_bad = torch.minimum(self.first_bad, bad_here)
            self.iteration = self.state.iteration = self.iteration + 1
            window_images += len(batch) * self.info.world_size
            skipped = getattr(batch, "skipped", None)
            if skipped:
                progress.add_skipped(len(skipped) if hasattr(skipped, "__len__") else int(skipped))
            it = self.iteration
            logs = it % t.log_every == 0 or it == t.iters
            saves = bool(t.checkpoint_every) and it % t.checkpoint_every == 0 and it < t.iters
            validates = bool(t.val_every) and it % t.val_every == 0 and it < t.iters
            stop = self._agree() if logs or saves or validates else False
            if logs:
                images_s = window_images / max(time.perf_counter() - window_start, 1e-9)
                self._log(progress, losses, images_s)
                window_start, window_images = time.perf_counter(), 0
            else:
                progress.update(it, None)
            if stop:
                self.save()
                raise TrainingInterrupted(
                    f"interrupted at iteration {it}; checkpoint saved to {self.path}, "
                    "run the same command to resume"
                )
            if saves:
                self.save()
            if validates:
                self.validate()

    def _agree(self) -> bool:
        """Share every rank's flags (one all-reduce, one host sync); raise if any loss was non-finite.

        Returns whether any rank was asked to stop. Every rank calls it at the same iterations.
        """
        go_on = torch.tensor(0 if self.stop_requested else 1, device=self.info.device)
        first_bad, go_on_all = D.all_reduce_min(torch.stack([self.first_bad, go_on]), self.info).tolist()
        if first_bad != _NONE:
            raise TrainingDiverged(
                f"loss became non-finite at iteration {first_bad}; stopped, the last good checkpoint is kept "
                f"at {self.path}; {_divergence_hint(self.config)}"
            )
        return not go_on_all

    def _log(self, progress: Progress, losses: dict[str, torch.Tensor], images_s: float) -> None:
        """Report this iteration's loss parts, averaged over ranks (one all-reduce), with lr and img/s."""
        names = list(losses)
        parts = torch.stack([losses[k].detach().float() for k in names])
        values = (D.all_reduce_sum(parts, self.info) / self.info.world_size).tolist()
        metrics = dict(zip(names, values, strict=True))
        metrics.update(lr=self.lr, img_s=images_s)
        progress.update(self.iteration, metrics)
        if self.info.is_main:
            self.callbacks.on_step(self.state, metrics)

    def validate(self) -> EvalResult | None:
        """Detect on the validation set (sharded over ranks), evaluate on rank 0, notify sinks.

        Batches are padded and post-processed as in inference (``infer.*``) but resized as
        ``train --resize/--max-size`` say (``data.resize``: the eval size of training, which the pipeline
        sets equal to ``infer.resize``; tiny-image runs validate at their training scale), not with
        :func:`~retinaflow.engine.infer.eval_data`."""
        from retinaflow.data.select import build_eval
        from retinaflow.engine.evaluate import evaluate_detections
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
            result = evaluate_detections(cfg.data.val_annotations, merged, list(cfg.class_names))
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


_RESUME_WATCHED = (("batch", "--batch"), ("lr", "--lr"))  # train.* keys a resume may change on purpose


def _say_resume_changes(saved: dict[str, Any], cfg: Config, path: Path) -> None:
    """One console line (call it on rank 0) per watched setting that differs from the checkpoint's.

    The run continues with the new value: the schedule and the data position count iterations, so a
    new ``--batch`` changes how many images each remaining iteration sees, a new ``--lr`` the step size.
    """
    before = saved.get("train") or {}
    for key, option in _RESUME_WATCHED:
        old, new = before.get(key), getattr(cfg.train, key)
        if old is not None and old != new:
            log.warning(
                "resuming %s: %s %s differs from the checkpoint's %s; continuing with %s",
                path, option, new, old, new,
            )  # fmt: skip


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
