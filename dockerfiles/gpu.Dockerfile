# syntax=docker/dockerfile:1.7
# GPU image: training, evaluation, ONNX export and TensorRT engine builds.
# NVIDIA's PyTorch container ships CUDA, cuDNN, NCCL, TensorRT and nvcc; its /etc/pip/constraint.txt
# (PIP_CONSTRAINT) keeps pip from replacing the container's own torch build.
#   docker build -f dockerfiles/gpu.Dockerfile -t ghcr.io/retinaflow/retinaflow-gpu:0.1.0-ngc25.12 .
FROM nvcr.io/nvidia/pytorch:25.12-py3

ARG RETINAFLOW_UID=10001
# Ampere, Ada, Hopper (+PTX for newer GPUs): no GPU is visible while the image builds.
ENV TORCH_CUDA_ARCH_LIST="8.0;8.6;8.9;9.0+PTX" \
    RETINAFLOW_KERNELS_DIR=/opt/retinaflow/kernels \
    TORCH_EXTENSIONS_DIR=/opt/retinaflow/torch_extensions \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1

WORKDIR /opt/retinaflow/src
COPY pyproject.toml README.md ./
COPY src ./src
COPY kernels /opt/retinaflow/kernels
COPY configs /opt/retinaflow/configs

# One layer: install retinaflow with its extras, compile the CUDA ops ahead of time, drop the sources.
RUN python -m pip install --no-cache-dir "./[onnx,mlops,pipeline]" \
    && python -m retinaflow.ops.build \
    && useradd --uid "${RETINAFLOW_UID}" --create-home --shell /usr/sbin/nologin retinaflow \
    && chown -R retinaflow /opt/retinaflow/torch_extensions \
    && rm -rf /opt/retinaflow/src

WORKDIR /home/retinaflow
USER 10001
ENTRYPOINT []
CMD ["retinaflow", "--help"]
