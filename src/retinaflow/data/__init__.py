"""retinaflow.data: COCO datasets, transforms, torch loaders, dataset checks and a synthetic generator.

Modules: ``batch`` (the Batch type) · ``coco`` (dataset + bad-entry accounting) · ``transforms`` ·
``loader`` (train/eval DataLoaders) · ``validate`` (cleaning, split, fingerprint) · ``synthetic``.
"""
