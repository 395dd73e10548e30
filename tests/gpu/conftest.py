"""The GPU tests reuse the tiny models and data of the task tests."""

from tests.ground.conftest import ground_config, make_tiny, tiny_data
from tests.segment.conftest import synthetic

__all__ = ["ground_config", "make_tiny", "synthetic", "tiny_data"]
