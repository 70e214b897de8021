"""Compile the pipeline (and each component, for reuse in other pipelines) to KFP IR YAML."""

from __future__ import annotations

from pathlib import Path

PIPELINE_FILE = "retinaflow_pipeline.yaml"


def compile_pipeline(output: str | Path) -> Path:
    """Write the compiled pipeline to ``output`` (a file, or a folder that gets PIPELINE_FILE)."""
    from kfp import compiler

    from retinaflow.kubeflow.pipeline import retinaflow_pipeline

    out = Path(output)
    if out.is_dir() or not out.suffix:
        out = out / PIPELINE_FILE
    out.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(retinaflow_pipeline, str(out))
    return out


def compile_components(folder: str | Path) -> list[Path]:
    """Write every component as ``folder/<name>.yaml`` (for ``kfp.components.load_component_from_file``)."""
    from kfp import compiler

    from retinaflow.kubeflow.components import ALL_COMPONENTS

    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    written = []
    for name, component in ALL_COMPONENTS.items():
        path = root / f"{name}.yaml"
        compiler.Compiler().compile(component, str(path))
        written.append(path)
    return written
