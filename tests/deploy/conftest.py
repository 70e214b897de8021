"""The C++ runner's tests run the engines' tiny checkpoint (shared with tests/export)."""

from tests.export.conftest import tiny_checkpoint  # noqa: F401  (a fixture, used by name)
