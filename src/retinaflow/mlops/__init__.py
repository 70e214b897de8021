"""retinaflow.mlops: MLflow tracking, S3 storage and the model registry with its promotion gate.

This package is the only place that imports mlflow and boto3; the core library reports through the
callback protocol of :mod:`retinaflow.engine.callbacks` and never imports it. Modules:

- :mod:`~retinaflow.mlops.tracking`: :class:`MlflowSink` (rank-0 training sink) and ``tracked_command``.
- :mod:`~retinaflow.mlops.writer`: the buffered background writer behind both (outage handling).
- :mod:`~retinaflow.mlops.runs`: experiments, the run-id sidecar, replay of spilled records.
- :mod:`~retinaflow.mlops.settings`: tracking URI (server or embedded sqlite), reachability, run context.
- :mod:`~retinaflow.mlops.storage`: ``s3://bucket/prefix`` inputs and outputs (cache, multipart, retries).
- :mod:`~retinaflow.mlops.registry`: model versions, aliases ``challenger``/``champion``, the promotion gate.
- :mod:`~retinaflow.mlops.plots`: precision-recall curves and sample-detection grids (matplotlib).
- :mod:`~retinaflow.mlops.redact`: keeps secrets out of logs, params and tags.
- :mod:`~retinaflow.mlops.cli`: argparse helpers that ``retinaflow.cli`` plugs in.
- :mod:`~retinaflow.mlops.errors`: one-line errors (storage, credentials, tracking server, registry).
"""
