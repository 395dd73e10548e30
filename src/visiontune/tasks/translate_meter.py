"""Evaluation of translation: windows stitched back into tiles, then scored per tile.

Scores are PSNR and SSIM (visiontune.metrics.image: Wang et al.'s Gaussian-window SSIM over
the valid region), overall and per band, on the valid pixels only, averaged over tiles. The
mean-image baseline (the per-pixel mean of the train targets) is scored beside them
(`baseline_psnr`, `baseline_ssim`, drawn beside `psnr` and `ssim` in the curves): a model
that does not beat it has learnt nothing from
the source.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from visiontune.data.tiling import Stitcher
from visiontune.errors import DataError
from visiontune.task import Batch, Metrics, Outputs

if TYPE_CHECKING:
    from visiontune.tasks.translate import TranslateTask

NODATA = "nodata.pixels"
"""Pixels left out as NaN or no-data, summed over the split's tiles."""


class TranslateMeter:
    """Accumulates the loss terms and the stitched tiles of one evaluation pass."""

    def __init__(self, task: TranslateTask) -> None:
        self.task = task
        options = task.options
        self.stitcher = Stitcher(options.crop_size, options.tile_overlap)
        self.loss_sum = 0.0
        self.items = 0
        self.parts: dict[str, float] = {}
        self.finished: list[tuple[str, torch.Tensor]] = []

    def update(self, outputs: Outputs, batch: Batch) -> None:
        if not len(batch):
            return
        loss = self.task.loss(outputs, batch)
        self.loss_sum += float(loss.loss_sum)
        self.items += len(batch)
        for name, value in loss.parts.items():
            self.parts[name] = self.parts.get(name, 0.0) + float(value)
        predictions = outputs["prediction"].detach().float().cpu()
        for i, ref in enumerate(batch.extras["refs"]):
            done = self.stitcher.add(predictions[i], ref)
            if done is not None:
                self.finished.append(done)

    def compute(self) -> Metrics:
        from visiontune.metrics.image import image_metrics

        if not self.finished:
            raise DataError("evaluation produced no complete tile")
        tiles = self.task.held_out_tiles()
        per_tile: dict[str, dict[str, float]] = {}
        sums: dict[str, float] = {}
        shown = []
        for name, prediction in self.finished:
            tile = tiles[name]
            scores = named(
                image_metrics(
                    prediction, tile.target, self.task.options.data_range, valid=tile.valid
                )
            )
            baseline = self.task.baseline_for(tile)
            base = image_metrics(
                baseline, tile.target, self.task.options.data_range, valid=tile.valid
            )
            scores.update({f"baseline_{k}": v for k, v in base.items() if "/" not in k})
            scores[NODATA] = float(tile.masked_pixels)
            per_tile[name] = scores
            for key, value in scores.items():
                sums[key] = sums.get(key, 0.0) + value
            if len(shown) < self.task.options.figures:
                shown.append(
                    {
                        "name": name,
                        "source": tile.source,
                        "prediction": prediction,
                        "target": tile.target,
                        "valid": tile.valid,
                        "baseline": baseline,
                        "psnr": scores["psnr"],
                        "baseline_psnr": scores["baseline_psnr"],
                    }
                )
        self.task.shown = shown
        count = len(per_tile)
        scalars = {k: v / count for k, v in sums.items() if k != NODATA}
        scalars[NODATA] = sums.get(NODATA, 0.0)
        scalars["loss"] = self.loss_sum / max(self.items, 1)
        scalars.update({f"loss.{k}": v / max(self.items, 1) for k, v in self.parts.items()})
        ordered = {
            k: scalars.pop(k) for k in ("psnr", "baseline_psnr", "ssim", "baseline_ssim", "loss")
        }
        return Metrics({**ordered, **scalars}, {"tiles": per_tile})


def named(scores: dict[str, float]) -> dict[str, float]:
    """`psnr/0` -> `psnr.band0`: dotted names stay out of the curves' headline panel."""
    return {k.replace("/", ".band"): float(v) for k, v in scores.items()}
