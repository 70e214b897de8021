"""deploy/cpp: the C++ runner of .pt2 engines builds against the installed libtorch, declares the operator
schemas of retinaflow.ops._library, refuses what it cannot run in one line, and (GPU) writes the detections
JSON of `retinaflow infer` on the same engine."""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from retinaflow.ops import _library

ROOT = Path(__file__).resolve().parents[2]
SOURCE = ROOT / "deploy" / "cpp"
needs_cmake = pytest.mark.skipif(shutil.which("cmake") is None, reason="needs cmake and a C++ compiler")


def build_runner(build_dir: Path) -> Path:
    """Configure and build deploy/cpp (about 45 s); returns the executable."""
    cmake = ["cmake", "-S", str(SOURCE), "-B", str(build_dir), f"-DPython3_EXECUTABLE={sys.executable}"]
    subprocess.run([*cmake, "-DCMAKE_BUILD_TYPE=Release"], check=True, capture_output=True)
    subprocess.run(["cmake", "--build", str(build_dir), "-j2"], check=True, capture_output=True)
    return build_dir / "retinaflow_runner"


def image_library() -> str:
    import torchvision

    return sorted(glob.glob(os.path.join(os.path.dirname(torchvision.__file__), "image*.so")))[0]


def test_runner_declares_the_python_operator_schemas():
    source = (SOURCE / "runner.cpp").read_text()
    declared = {
        m[0]: re.sub(r'"\s*"', "", m[1]) for m in re.findall(r'm\.def\(\s*"(\w+)(\(.*?)"\);', source, re.S)
    }
    assert declared == _library.SCHEMAS


@pytest.fixture(scope="module")
def runner(tmp_path_factory) -> Path:
    return build_runner(tmp_path_factory.mktemp("runner"))


@needs_cmake
@pytest.mark.slow
def test_runner_builds_and_its_errors_are_one_line(runner, tmp_path):
    fake = tmp_path / "missing.pt2"
    proc = subprocess.run([str(runner)], capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "ENGINE.pt2" in proc.stderr
    args = [str(runner), str(fake), str(tmp_path), str(tmp_path / "d.json")]
    proc = subprocess.run(
        [*args, "--kernels", "/nonexistent.so", "--image-lib", image_library()],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1 and "cannot load the retinaflow CUDA kernels" in proc.stderr
    proc = subprocess.run(
        [*args, "--kernels", image_library(), "--image-lib", image_library()], capture_output=True, text=True
    )
    assert proc.returncode == 1 and "engine not found" in proc.stderr


@needs_cmake
@pytest.mark.gpu
def test_runner_writes_the_detections_of_retinaflow_infer(runner, tiny_checkpoint, synth_small, tmp_path):
    from retinaflow.config import ExportConfig
    from retinaflow.export.aoti import export_pt2
    from retinaflow.export.engine_infer import infer_engine
    from retinaflow.ops import _ext

    path, _ = tiny_checkpoint
    engine = export_pt2(path, tmp_path / "cuda.pt2", ExportConfig(min_batch=1, max_batch=4), device="cuda")
    images = synth_small.val_images
    infer_engine(engine, images, tmp_path / "python.json", overrides={"batch": 4})
    cmd = [str(runner), str(engine), str(images), str(tmp_path / "cpp.json"), "--batch", "4"]
    proc = subprocess.run(
        [*cmd, "--kernels", _ext.load(), "--image-lib", image_library()], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    expected = json.loads((tmp_path / "python.json").read_text())
    got = json.loads((tmp_path / "cpp.json").read_text())
    assert len(got) == len(expected) > 0
    # Order-independent: a random-init model's scores are near-ties, and a grey level of difference between
    # the JPEG decoders (PIL vs torchvision's) reorders them (on the H200, 294 of 600 matched by position).
    assert matched(expected, got) >= 0.95 * len(expected)


def matched(expected: list[dict], got: list[dict]) -> int:
    """Detections of ``expected`` with a partner in ``got``: same image and class, score within 1e-2, box
    corners within 1 px; each detection of ``got`` partners at most one."""
    free: dict[tuple[int, int], list[dict]] = {}
    for g in got:
        free.setdefault((g["image_id"], g["category_id"]), []).append(g)
    count = 0
    for e in sorted(expected, key=lambda d: -d["score"]):
        pool = free.get((e["image_id"], e["category_id"]), [])
        for i, g in enumerate(pool):
            close = max(abs(a - b) for a, b in zip(g["bbox"], e["bbox"], strict=True)) < 1.0
            if close and abs(g["score"] - e["score"]) < 1e-2:
                count += 1
                del pool[i]
                break
    return count


def test_matched_pairs_detections_regardless_of_order() -> None:
    a = [{"image_id": 1, "category_id": 2, "bbox": [0, 0, 10, 10], "score": 0.5 + i * 1e-4} for i in range(3)]
    b = [*reversed(a), {"image_id": 1, "category_id": 3, "bbox": [0, 0, 10, 10], "score": 0.5}]
    assert matched(a, b) == 3
    assert matched(a, [{**d, "bbox": [5, 0, 10, 10]} for d in a]) == 0
