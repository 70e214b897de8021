"""``retinaflow pipeline run --local``: the whole pipeline on this machine (the ``make demo`` job).

kfp.local's SubprocessRunner runs every component as a subprocess of this Python environment
(``use_venv=False``: retinaflow must be installed here); Kubernetes settings (GPUs, Secrets, node
selectors) are ignored. The data is the synthetic shapes dataset, training runs on the CPU with the
``synthetic_cpu`` preset, and MLflow is the embedded sqlite store under the output folder unless
``MLFLOW_TRACKING_URI`` points elsewhere.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from retinaflow.config import Config
from retinaflow.errors import RetinaflowError
from retinaflow.kubeflow.params import check_arguments, config_arguments
from retinaflow.kubeflow.steps.common import FAILURE_LOG_ENV

PRESET = "synthetic_cpu"
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class LocalRunFailed(RetinaflowError):
    """A task of the local pipeline run failed."""

    exit_code = 7


@dataclass
class LocalRunOptions:
    output: Path = Path("runs/pipeline")
    images: int = 160
    iters: int | None = None
    seed: int = 0
    experiment: str = "retinaflow-local"
    model_name: str = "retinaflow-demo"
    arguments: dict[str, Any] = field(default_factory=dict)


@dataclass
class LocalRunResult:
    output: Path
    artifacts: Path
    tracking_uri: str
    summary: dict[str, Any]
    versions: list[dict[str, Any]]


def local_arguments(opts: LocalRunOptions, data: Any, output: Path) -> dict[str, Any]:
    """Pipeline arguments for a CPU run on the synthetic dataset ``data`` (SynthPaths; None: the
    arguments without dataset paths, to check them before the data exists)."""
    args = config_arguments(Config.load(PRESET))
    if data is not None:
        args.update(
            images=str(data.train_images),
            annotations=str(data.train_annotations),
            val_images=str(data.val_images),
            val_annotations=str(data.val_annotations),
        )
    args.update(
        gpus=0,
        nodes=1,
        checkpoint_root=str(output / "checkpoints"),
        experiment=opts.experiment,
        model_name=opts.model_name,
        seed=opts.seed,
    )
    if opts.iters is not None:
        args["iters"] = opts.iters
        args["checkpoint_every"] = max(1, min(int(args.get("checkpoint_every", 1000)), opts.iters))
        scaled = [f"train.warmup={max(1, opts.iters // 5)}", f"train.milestones=[{int(opts.iters * 0.75)}]"]
        kept = [
            o for o in args.get("overrides", []) if not o.startswith(("train.warmup=", "train.milestones="))
        ]
        args["overrides"] = kept + scaled
    args.update(opts.arguments)
    return args


def run_local(opts: LocalRunOptions) -> LocalRunResult:
    """Synthesize data, run every pipeline step with kfp.local, return where everything is."""
    from kfp import local

    from retinaflow.data.synthetic import SynthConfig, generate
    from retinaflow.kubeflow.pipeline import retinaflow_pipeline
    from retinaflow.mlops.settings import resolve_tracking_uri

    output = opts.output.resolve()
    check_arguments(local_arguments(opts, None, output))  # before anything runs: see check_arguments
    output.mkdir(parents=True, exist_ok=True)
    failures = output / "failures.jsonl"
    failures.unlink(missing_ok=True)
    os.environ[FAILURE_LOG_ENV] = str(failures)
    os.environ.setdefault("RETINAFLOW_PROJECT_DIR", str(output))
    os.environ["MLFLOW_TRACKING_URI"] = resolve_tracking_uri()
    # the components run `python3 -m kfp.dsl.executor_main`: make that this interpreter
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    data = generate(SynthConfig(out=output / "data", images=opts.images, seed=opts.seed))
    artifacts = output / "artifacts"
    local.init(
        runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(artifacts), raise_on_error=True
    )
    try:
        with _plain_kfp_logs():
            retinaflow_pipeline(**local_arguments(opts, data, output))
    except RuntimeError as exc:
        raise run_failure(exc, failures) from exc
    return LocalRunResult(
        output=output,
        artifacts=artifacts,
        tracking_uri=os.environ["MLFLOW_TRACKING_URI"],
        summary=_latest_summary(artifacts),
        versions=_versions(opts.model_name),
    )


@contextlib.contextmanager
def _plain_kfp_logs() -> Iterator[None]:
    """kfp.local colours task names and statuses with ANSI codes; drop them when the output is not a
    terminal (logs, CI), restore them after."""
    from kfp.local import logging_utils

    if sys.stdout.isatty():
        yield
        return
    colours = {k: v for k, v in vars(logging_utils.Color).items() if k.isupper()}
    for name in colours:
        setattr(logging_utils.Color, name, "")
    try:
        yield
    finally:
        for name, value in colours.items():
            setattr(logging_utils.Color, name, value)


def run_failure(exc: BaseException, failures: Path) -> LocalRunFailed:
    """One plain-text line for a failed run: the failing step and its cause, as the step recorded it
    (``steps.common.reports_failure``); else kfp.local's own message without its colour codes."""
    records = []
    if failures.is_file():
        for line in failures.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                records.append(json.loads(line))
    if records:
        last = records[-1]
        return LocalRunFailed(f"pipeline step {last.get('step')} failed: {last.get('error')}")
    text = _ANSI.sub("", str(exc)).strip()
    return LocalRunFailed(text.splitlines()[0] if text else type(exc).__name__)


def _latest_summary(artifacts: Path) -> dict[str, Any]:
    from retinaflow.kubeflow.steps.evaluation import SUMMARY_FILE

    found = sorted(artifacts.glob(f"*/evaluate*/report/{SUMMARY_FILE}"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise LocalRunFailed(f"the run left no evaluation summary under {artifacts}")
    summary = dict(json.loads(found[-1].read_text()))
    summary["report_dir"] = str(found[-1].parent)
    return summary


def _versions(model_name: str) -> list[dict[str, Any]]:
    from retinaflow.kubeflow.steps.registration import registry_state

    return registry_state(model_name)


def print_summary(result: LocalRunResult) -> None:
    """What ``make demo`` shows: mAP, the registry, where the artifacts are, how to open MLflow."""
    s = result.summary
    print(f"mAP (val, IoU .50:.95): PyTorch {s['map']:.4f}   ONNX Runtime {s['onnx_map']:.4f}"
          f"   (drop {s['export_drop']:+.4f}, allowed {s['max_export_drop']:.4f})")  # fmt: skip
    print("model registry:")
    for v in result.versions:
        aliases = ",".join(v.get("aliases", [])) or "-"
        print(f"  {v['name']} v{v['version']}  aliases: {aliases}  mAP: {v.get('map', '?')}")
    print(f"artifacts (kfp.local pipeline root): {result.artifacts}")
    print(f"evaluation report: {s['report_dir']}")
    print(f"MLflow store: {result.tracking_uri}")
    if result.tracking_uri.startswith("sqlite:///"):
        print(f"open the MLflow UI: mlflow ui --backend-store-uri {result.tracking_uri} --port 5000")
