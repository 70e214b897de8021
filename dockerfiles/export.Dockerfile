# syntax=docker/dockerfile:1.7
# Export image: TensorRT engines (.plan) with the retinaflow plugins, INT8 (ModelOpt), and the tests that
# need them (pytest -m tensorrt). NVIDIA's PyTorch container ships CUDA with nvcc, TensorRT (headers,
# libnvinfer, Python bindings) and the torch build the kernels compile against; the plugin library is built
# here with the same torch.utils.cpp_extension mechanism as the PyTorch ops.
#   docker build -f dockerfiles/export.Dockerfile -t ghcr.io/retinaflow/retinaflow-export:0.1.0-ngc25.12 .
#   docker run --gpus all --rm ghcr.io/retinaflow/retinaflow-export:0.1.0-ngc25.12
FROM nvcr.io/nvidia/pytorch:25.12-py3

ARG RETINAFLOW_UID=10001
# No GPU is visible while the image builds: name the architectures (Ampere, Ada, Hopper, +PTX).
ENV TORCH_CUDA_ARCH_LIST="8.0;8.6;8.9;9.0+PTX" \
    RETINAFLOW_KERNELS_DIR=/opt/retinaflow/kernels \
    TORCH_EXTENSIONS_DIR=/opt/retinaflow/torch_extensions \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1

WORKDIR /opt/retinaflow/app
COPY pyproject.toml README.md ./
COPY src ./src
COPY tests ./tests
COPY kernels /opt/retinaflow/kernels

# One layer: retinaflow with ONNX + ModelOpt, the test tools, the CUDA ops and the TensorRT plugin library.
RUN python -m pip install --no-cache-dir "./[onnx,quantize]" \
        "onnxruntime-extensions==0.15.2" "onnxconverter-common==1.16.0" "pytest==9.2.0" "pytest-timeout==2.4.0" \
    && python -m retinaflow.ops.build \
    && python -m retinaflow.export.trt_plugins \
    && useradd --uid "${RETINAFLOW_UID}" --create-home --shell /usr/sbin/nologin retinaflow \
    && chown -R retinaflow /opt/retinaflow/torch_extensions /opt/retinaflow/app

USER 10001
ENTRYPOINT []
CMD ["python", "-m", "pytest", "-q", "-m", "tensorrt or gpu", "tests/export", "tests/kernels"]
