"""retinaflow.data."""
