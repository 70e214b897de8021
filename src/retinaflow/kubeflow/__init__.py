"""Kubeflow Pipelines glue: thin KFP v2 components, the training DAG and the ``retinaflow pipeline`` CLI.

Layout:

- ``images``: the container image tags, pinned in this one module; ``cluster``: the Kubernetes
  names (GPU resource and node label, Secret keys) the DAG and the TrainJob share.
- ``steps``: plain functions (no kfp import) that map a component's inputs onto library calls; the
  components call exactly one of them, so the logic is unit-testable without a KFP server.
- ``components``: the ``@dsl.component`` definitions (compiled copies live in the repository's
  ``components/`` folder).
- ``pipeline``: the DAG; its compiled YAML lives in ``pipelines/``.
- ``local``, ``submit``, ``cli``: ``retinaflow pipeline run --local | compile | submit``.

Importing this package does not import kfp; the modules that need it do.
"""

from __future__ import annotations
