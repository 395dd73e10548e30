"""The `task:` section of `type: translate` (paired image-to-image) and its weighted losses."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from visiontune.config.base import Section
from visiontune.user_code import check_dotted


class LossTermConfig(Section):
    """One weighted term of the loss: a built-in by `name`, or your function by `fn`."""

    name: str | None = Field(
        default=None, description="A built-in image loss: l1, mse, ssim, ms_ssim, gradient, lpips."
    )
    fn: str | None = Field(
        default=None,
        description="`package.module:function` called as fn(outputs, batch, **args) and "
        "returning one loss per item, shape [N] (imported only because the config names it).",
    )
    weight: float = Field(default=1.0, ge=0)
    args: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments of fn.")
    label: str | None = Field(
        default=None, description="Name in metrics.jsonl; default: `name`, or fn's function."
    )

    @model_validator(mode="after")
    def _one_kind(self) -> LossTermConfig:
        if (self.name is None) == (self.fn is None):
            raise ValueError("a loss term needs exactly one of `name` (built-in) or `fn`")
        if self.fn is not None:
            check_dotted(self.fn)
        elif self.args:
            raise ValueError("`args` are passed to `fn`; built-in terms take none")
        return self

    @property
    def term(self) -> str:
        """The term's name in logs: its label, the built-in's name, or the function's name."""
        if self.label:
            return self.label
        return self.name or str(self.fn).rsplit(":", 1)[-1]


class BandsConfig(Section):
    """Which bands of one side's files to use, and how they become model inputs."""

    dir: str = Field(description="Sub-folder of each split folder holding this side's files.")
    bands: list[int] | None = Field(
        default=None, description="0-based band indices to keep (default: all, in file order)."
    )
    db_clip: tuple[float, float] | None = Field(
        default=None, description="SAR in dB: values clipped to [low, high] before scaling."
    )
    scale: Literal["stats", "range", "none"] = Field(
        default="stats",
        description="stats: (x - mean) / std per band (computed on the train split and stored "
        "with the run, unless mean/std are given); range: (x - low) / (high - low) into [0, 1] "
        "with `range`; none: as stored.",
    )
    range: tuple[float, float] | None = Field(
        default=None, description="[low, high] for scale: range (e.g. [0, 255] for 8-bit RGB)."
    )
    mean: list[float] | None = None
    std: list[float] | None = None
    nodata: float | None = Field(
        default=None,
        description="Value meaning no data (besides NaN); default: the file's GDAL_NODATA tag.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> BandsConfig:
        if self.scale == "range" and self.range is None:
            raise ValueError(f"{self.dir}: scale: range needs `range: [low, high]`")
        if self.range is not None and self.range[1] <= self.range[0]:
            raise ValueError(f"{self.dir}: range high must exceed low")
        if (self.mean is None) != (self.std is None):
            raise ValueError(f"{self.dir}: give both mean and std, or neither")
        if self.std is not None and any(s <= 0 for s in self.std):
            raise ValueError(f"{self.dir}: std must be positive")
        return self


class TranslateTaskConfig(Section):
    """Paired image-to-image translation (SAR -> optical): `<split>/<source.dir>/<name>` is
    translated into `<split>/<target.dir>/<name>` (the same file name)."""

    type: Literal["translate"] = "translate"
    default_metric: ClassVar[str] = "psnr"
    source: BandsConfig
    target: BandsConfig
    crop_size: int = Field(default=64, ge=8, description="Model input side, in pixels.")
    crops_per_tile: int = Field(
        default=16, ge=1, description="Random crops drawn from each train tile per epoch."
    )
    flips: bool = Field(
        default=True, description="Random h/v flips, applied identically to source and target."
    )
    tile_overlap: int = Field(
        default=16,
        ge=0,
        description="Pixels shared by neighbouring windows when a tile larger "
        "than crop_size is evaluated or predicted (blended, so seams do not show).",
    )
    data_range: float = Field(
        default=1.0, gt=0, description="Span of the target in model space, for PSNR and SSIM."
    )
    losses: list[LossTermConfig] = Field(
        default_factory=lambda: [LossTermConfig(name="l1")],
        description="Weighted sum; each term is logged raw and weighted.",
    )
    figures: int = Field(default=3, ge=0, description="Source/prediction/target figures per eval.")

    @field_validator("losses")
    @classmethod
    def _distinct(cls, value: list[LossTermConfig]) -> list[LossTermConfig]:
        names = [t.term for t in value]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"loss terms named twice: {twice} (set `label` to tell them apart)")
        if not value:
            raise ValueError("task.losses needs at least one term")
        return value

    @model_validator(mode="after")
    def _overlap(self) -> TranslateTaskConfig:
        if self.tile_overlap >= self.crop_size:
            raise ValueError("task.tile_overlap must be smaller than task.crop_size")
        return self
