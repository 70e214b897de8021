"""Container images of the pipeline's components: every tag is pinned here and nowhere else.

The images are built from ``dockerfiles/`` (see ``dockerfiles/README.md``) and pushed to
``REGISTRY``; change the registry or the tags here and recompile (``retinaflow pipeline compile``)
to point the pipeline at your own build. ``NGC_PYTORCH`` is the base of the GPU image.
"""

from __future__ import annotations

from retinaflow import __version__

REGISTRY = "ghcr.io/retinaflow"
NGC_PYTORCH = "nvcr.io/nvidia/pytorch:25.12-py3"
MLFLOW_VERSION = "3.17.2"

#: CUDA, TensorRT and the AOT-built retinaflow CUDA ops: train, evaluate, export, build_engine.
GPU_IMAGE = f"{REGISTRY}/retinaflow-gpu:{__version__}-ngc25.12"
#: Slim CPU image (no CUDA) for data preparation, registration and launching Trainer jobs.
CPU_IMAGE = f"{REGISTRY}/retinaflow-cpu:{__version__}"
#: The MLflow tracking server of ``manifests/mlflow``.
MLFLOW_IMAGE = f"{REGISTRY}/mlflow-server:{MLFLOW_VERSION}"

ALL_IMAGES = {"gpu": GPU_IMAGE, "cpu": CPU_IMAGE, "mlflow": MLFLOW_IMAGE}
