"""Paired image-to-image translation (SAR -> optical): `task.type: translate`.

Data are paired folders (visiontune.data.paired) read into model space once: bands selected,
SAR clipped in dB, each band scaled by statistics of the train split (pinned into the run's
config.yaml, so eval and predict scale exactly as training did) or by a given range. Training
sees random crops; evaluation and prediction see every tile whole, as overlapping windows the
meter stitches back (visiontune.data.tiling) before scoring, so a metric is a tile's metric.
The model is the user's own (`model.builder`, visiontune.models.custom); the loss is the
weighted sum of `task.losses` (visiontune.loss_terms).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from visiontune.config.schema import Config, TranslateTaskConfig
from visiontune.config.translate import BandsConfig
from visiontune.data.paired import (
    RawPair,
    Tile,
    TileWindows,
    TrainCrops,
    band_stats,
    model_space_tiles,
    read_split,
)
from visiontune.errors import ConfigError, DataError, TrainingError
from visiontune.loss_terms import LossTerm, build_terms, weighted_loss
from visiontune.models.custom import CustomAdapter
from visiontune.task import Batch, LossOut, Metrics, Outputs, Splits
from visiontune.tasks import translate_io
from visiontune.tasks.translate_meter import TranslateMeter
from visiontune.tasks.translate_pictures import save_comparison

log = logging.getLogger(__name__)


class TranslateTask:
    """Implements visiontune.task.Task for paired image-to-image translation."""

    name = "translate"

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.options: TranslateTaskConfig = cfg.task  # type: ignore[assignment]
        self._splits: Splits | None = None
        self._terms: list[LossTerm] | None = None
        self.baseline: torch.Tensor | None = None
        """Per-pixel mean of the train targets (model space): the mean-image baseline."""
        self.held: dict[str, Tile] = {}
        """Val/test tiles by name, which the meter scores its stitched predictions against."""
        self.shown: list[dict[str, Any]] = []
        """Tiles of the last evaluation kept for its figures."""

    @property
    def source(self) -> BandsConfig:
        return self.options.source

    @property
    def target(self) -> BandsConfig:
        return self.options.target

    # --- data -------------------------------------------------------------------------------

    def datasets(self) -> Splits:
        """The splits; the loss terms are resolved with them, so `config check` names a loss
        function that cannot be imported before any training starts."""
        if self._splits is None:
            self._splits = self._read_splits()
            _ = self.terms
        return self._splits

    def _read_splits(self) -> Splits:
        data = self.cfg.data
        if data.format != "paired":
            raise ConfigError(
                [f"data.format: task.type translate reads `paired`, not {data.format!r}"]
            )
        raw = read_split(data.train, self.source, self.target)
        self._pin_stats(raw)
        tiles = model_space_tiles(raw, self.source, self.target)
        self._check_sizes(tiles, data.train)
        self._log_masked("train", tiles)
        self.baseline = mean_image(tiles)
        opts = self.options
        train = TrainCrops(
            tiles, opts.crop_size, opts.crops_per_tile, opts.flips, self.cfg.train.seed
        )
        evals = {}
        for split in ("val", "test"):
            folder = getattr(data, split)
            if folder is not None:
                held = model_space_tiles(
                    read_split(folder, self.source, self.target), self.source, self.target
                )
                self._check_sizes(held, folder)
                self._log_masked(split, held)
                self.held.update({t.name: t for t in held})
                evals[split] = TileWindows(held, opts.crop_size, opts.tile_overlap)
        return Splits(train, evals.get("val"), evals.get("test"))

    def _pin_stats(self, raw: list[RawPair]) -> None:
        """Compute per-band statistics on the train split where they are needed and not given."""
        for attr, index in (("source", 1), ("target", 2)):
            side: BandsConfig = getattr(self.options, attr)
            if side.scale != "stats" or side.mean is not None:
                continue
            mean, std = band_stats([r[index] for r in raw], [r[3] for r in raw], side)
            log.info(
                "task.%s statistics from the train split: mean %s std %s",
                attr,
                [round(m, 4) for m in mean],
                [round(s, 4) for s in std],
            )
            pinned = side.model_copy(update={"mean": mean, "std": std})
            self.options = self.options.model_copy(update={attr: pinned})

    def _check_sizes(self, tiles: list[Tile], split: Path) -> None:
        size = self.options.crop_size
        small = [t.name for t in tiles if min(t.source.shape[-2:]) < size]
        if small:
            raise DataError(f"{split}: tiles {small[:5]} are smaller than task.crop_size {size}")

    @staticmethod
    def _log_masked(split: str, tiles: list[Tile]) -> None:
        masked = sum(t.masked_pixels for t in tiles)
        if masked:
            total = sum(t.valid.numel() for t in tiles)
            per_tile = {t.name: t.masked_pixels for t in tiles if t.masked_pixels}
            log.warning(
                "%s: %d of %d pixels are NaN or no-data (%s): left out of losses and metrics",
                split,
                masked,
                total,
                per_tile,
            )

    def resolved_config(self) -> Config:
        """The config with the train-split statistics pinned (eval/predict scale alike)."""
        self.datasets()
        return self.cfg.model_copy(update={"task": self.options})

    def collate(self, samples: list[dict[str, Any]]) -> Batch:
        inputs = {"source": torch.stack([s["source"] for s in samples])}
        targets = {
            "target": torch.stack([s["target"] for s in samples]),
            "valid": torch.stack([s["valid"] for s in samples]),
        }
        extras = {"refs": [s["ref"] for s in samples]} if "ref" in samples[0] else {}
        return Batch(inputs, [s["id"] for s in samples], targets, extras=extras)

    # --- model, loss, evaluation ------------------------------------------------------------

    def adapter(self) -> CustomAdapter:
        if self.cfg.model.builder is None:
            raise ConfigError(
                [
                    "model.builder: task.type translate trains your own model; set "
                    "model.builder: package.module:function"
                ]
            )
        return CustomAdapter(self.cfg)

    @property
    def terms(self) -> list[LossTerm]:
        if self._terms is None:
            self._terms = build_terms(self.options.losses, self.options.data_range)
        return self._terms

    def loss(self, outputs: Outputs, batch: Batch) -> LossOut:
        check_prediction(outputs, batch)
        return weighted_loss(self.terms, outputs, batch)

    def held_out_tiles(self) -> dict[str, Tile]:
        self.datasets()
        return self.held

    def baseline_for(self, tile: Tile) -> torch.Tensor:
        """The mean-image baseline at the tile's size (the band means where sizes differ)."""
        self.datasets()
        assert self.baseline is not None
        base = self.baseline
        if base.shape[-2:] != tile.target.shape[-2:]:
            base = base.mean(dim=(1, 2), keepdim=True)
        return base.expand_as(tile.target)

    def meter(self) -> TranslateMeter:
        return TranslateMeter(self)

    def save_figures(self, metrics: Metrics, out_dir: Path) -> list[Path]:
        paths = []
        for tile in self.shown:
            path = Path(out_dir) / f"translate_{tile['name']}.png"
            save_comparison(tile, self.source, self.target, path)
            paths.append(path)
        return paths

    # --- prediction -------------------------------------------------------------------------

    def prediction_batches(self, inputs: list[dict[str, Any]]) -> Iterator[Batch]:
        """Windows of each input tile; refuses before computing when an output exists."""
        yield from translate_io.prediction_batches(self, inputs)

    def predictions(self, outputs: Outputs, batch: Batch, out_dir: Path) -> list[dict[str, Any]]:
        return translate_io.write_predictions(self, outputs, batch, out_dir)


def mean_image(tiles: list[Tile]) -> torch.Tensor:
    """Per-pixel mean of the train targets over their valid pixels (model space); the per-band
    mean broadcast to a pixel where no train tile is valid, and for tiles of other sizes."""
    shapes = {tuple(t.target.shape) for t in tiles}
    band_mean = torch.stack([t.target[:, t.valid[0]].mean(dim=1) for t in tiles]).mean(0)
    if len(shapes) != 1:
        return band_mean[:, None, None]
    total = sum(t.target * t.valid for t in tiles)
    count = sum(t.valid.float() for t in tiles)
    return torch.where(count > 0, total / count.clamp(min=1), band_mean[:, None, None])


def check_prediction(outputs: Outputs, batch: Batch) -> None:
    """The model's prediction must have the target's shape; say what each is otherwise."""
    prediction = outputs.get("prediction")
    target = batch.targets["target"]
    if prediction is None:
        raise TrainingError(
            f"the model returned {sorted(outputs)}: return a tensor, or a dict with `prediction`"
        )
    if prediction.shape != target.shape:
        raise TrainingError(
            f"the model's prediction has shape {tuple(prediction.shape)} but the target "
            f"{tuple(target.shape)} ([N, target bands, H, W]): check its output channels"
        )
