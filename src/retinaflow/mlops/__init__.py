"""retinaflow.mlops."""
