"""Kubernetes names both the DAG (``pipeline``) and the TrainJob (``trainjob``) use: GPU resource and
node label, Secret keys, the ``/dev/shm`` size. Change them here; ``manifests/`` must agree."""

from __future__ import annotations

GPU_RESOURCE = "nvidia.com/gpu"
#: Label set on GPU nodes by NVIDIA's GPU feature discovery (GPU operator); see manifests/gpu.
GPU_NODE_LABEL = ("nvidia.com/gpu.present", "true")
#: Keys read from the Secrets of manifests/secrets (same names as the environment variables).
S3_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL")
MLFLOW_KEYS = ("MLFLOW_TRACKING_URI",)
#: Memory-backed ``/dev/shm`` of the training pods (DataLoader workers share batches through it).
SHM_SIZE = "16Gi"
