"""Configuration: the schema (every option) and the loader (YAML + overrides + errors)."""

from visiontune.config.load import load_config
from visiontune.config.schema import Config

__all__ = ["Config", "load_config"]
