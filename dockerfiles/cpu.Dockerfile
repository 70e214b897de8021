# syntax=docker/dockerfile:1.7
# Slim CPU image: data preparation (validation, split, fingerprint, S3 staging), registration and
# the TrainJob launcher. torch comes from PyTorch's CPU wheel index (no CUDA libraries).
#   docker build -f dockerfiles/cpu.Dockerfile -t ghcr.io/retinaflow/retinaflow-cpu:0.1.0 .
FROM python:3.11.11-slim-bookworm AS build

ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu \
        torch==2.14.1 torchvision==0.29.1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install --no-cache-dir "./[onnx,mlops,pipeline]"

FROM python:3.11.11-slim-bookworm

ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1
COPY --from=build /opt/venv /opt/venv
RUN useradd --uid 10001 --create-home --shell /usr/sbin/nologin retinaflow
WORKDIR /home/retinaflow
USER 10001
CMD ["retinaflow", "--help"]
