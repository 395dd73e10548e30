"""Optional experiment trackers; the run directory's JSONL files are always written."""

from __future__ import annotations

from pathlib import Path

from visiontune.errors import ConfigError


class TensorBoard:
    def __init__(self, log_dir: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError(
                [
                    "tracking.tensorboard: the tensorboard package is not installed "
                    "(pip install 'visiontune[tensorboard]')"
                ]
            ) from None
        self.writer = SummaryWriter(log_dir=str(log_dir))

    def log(self, step: int, scalars: dict[str, float], prefix: str) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(f"{prefix}/{key}", value, step)

    def close(self) -> None:
        self.writer.close()
