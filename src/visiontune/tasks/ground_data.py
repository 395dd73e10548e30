"""Prepared grounding samples: rendered chat texts, lengths, lazily decoded images.

Rendering and counting happen once, before training, so that a conversation too long for the
model is found (and skipped or reported) up front instead of as an out-of-memory mid-epoch;
only image decoding is left for `__getitem__`, where a file that fails is a counted skip.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from visiontune.data.conversations import ClickTarget
from visiontune.data.images import decode_image
from visiontune.errors import DataError
from visiontune.task import Skipped


@dataclass(frozen=True)
class GroundSample:
    """One conversation, ready to tokenise.

    `text` is the whole rendered conversation (trained on), `prompt` everything before the
    last answer plus the generation header (what evaluation asks the model), `length` the
    token count after image-token expansion.
    """

    sample_id: str
    images: list[Path]
    sizes: list[tuple[int, int]]
    text: str
    prompt: str
    target: ClickTarget | None
    length: int


class GroundDataset(Dataset):
    """Prepared samples; `__getitem__` decodes the images or returns Skipped."""

    def __init__(self, samples: list[GroundSample]) -> None:
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def keys(self) -> list[str]:
        """Sample id and rendered conversation per sample: what a data position refers to."""
        return [f"{s.sample_id}\t{s.text}" for s in self.samples]

    @property
    def lengths(self) -> list[int]:
        """Token counts after image expansion, for batching samples of similar length."""
        return [s.length for s in self.samples]

    def __getitem__(self, index: int) -> dict[str, Any] | Skipped:
        sample = self.samples[index]
        try:
            images = [decode_image(path) for path in sample.images]
        except DataError as err:
            return Skipped(sample.sample_id, str(err))
        sizes = [image.size for image in images]
        if sizes != sample.sizes:
            return Skipped(
                sample.sample_id, f"image size changed since the check: {sizes} != {sample.sizes}"
            )
        return {
            "id": sample.sample_id,
            "text": sample.text,
            "prompt": sample.prompt,
            "images": images,
            "sizes": sizes,
            "target": sample.target,
        }


def hold_out(
    samples: list[GroundSample], fraction: float, seed: int
) -> tuple[list[GroundSample], list[GroundSample]]:
    """A seeded random `fraction` of the train samples becomes the validation split."""
    order = list(range(len(samples)))
    random.Random(seed).shuffle(order)
    held = set(order[: max(1, round(len(samples) * fraction))])
    train = [s for i, s in enumerate(samples) if i not in held]
    return train, [s for i, s in enumerate(samples) if i in held]
