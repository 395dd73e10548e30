r"""TerraMind (IBM/ESA's geospatial foundation model) as a `model.builder` for image translation.

```yaml
model:
  builder: visiontune.models.terramind:build
  builder_args: {name: terramind_v1_tiny, modalities: [S1RTC], out_channels: 3, pretrained: true}
```

TerraMind's code lives in terratorch (`pip install 'visiontune[terratorch]'`, which needs
torchvision and timm). `build` takes one of terratorch's TerraMind encoders from its
`BACKBONE_REGISTRY` (`terramind_v1_tiny`, `_small`, `_base`, `_large`, and the `_tim`
variants), runs it on the source modalities, and turns the last layer's patch tokens back into
pixels with a linear head (one 16 x 16 patch of `out_channels` bands per token). The encoder's
attention is a fused `attn.qkv` Linear, so a LoRA target is `re:.*encoder\.\d+\.attn\.qkv$` and
the head is trained in full (`lora.modules_to_save: [head]`).

Weights: `pretrained: true` downloads terratorch's own checkpoint for the variant
(ibm-esa-geospatial/TerraMind-1.0-<size>); `hub_id` (+ `hub_filename`) names another hub
repository, `ckpt_path` a local file; otherwise the weights are random. Inputs are expected
standardised as in pretraining (for S1RTC in dB: mean [-10.93, -17.329], std [4.391, 4.459]).

The full models of terratorch's `FULL_MODEL_REGISTRY` are refused on purpose: `_generate` samples
discrete tokens and decodes them by diffusion, so no gradient reaches its weights, and `_encdec`
expects embedding modules built in Python (and predicts tokens, not pixels).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from visiontune.errors import ConfigError

PATCH_SIZE = 16  # every TerraMind 1.0 model embeds 16 x 16 patches
FULL_MODEL_SUFFIXES = ("_generate", "_encdec")
Modality = str | dict[str, int]  # a pretrained modality name, or {new_name: band count}


def _registry() -> Any:
    """terratorch's BACKBONE_REGISTRY, or an error that says how to get it."""
    try:
        from terratorch.registry import BACKBONE_REGISTRY
    except Exception as error:  # a torchvision built for another torch raises RuntimeError
        raise ConfigError(
            [
                "model.builder: visiontune.models.terramind:build needs the terratorch extra "
                "(pip install 'visiontune[terratorch]'), which needs torchvision and timm "
                f"working with this torch; importing terratorch failed: {error}"
            ]
        ) from error
    return BACKBONE_REGISTRY


class TerraMindTranslator(nn.Module):
    """A TerraMind encoder on the source image(s) and a per-patch linear head back to pixels.

    `forward(source)` takes [N, sum(band_counts), H, W] with H and W multiples of 16 and returns
    [N, out_channels, H, W]. Several input modalities share one `source` tensor, split along the
    bands in the order of `modalities`; the encoder merges their tokens (terratorch's
    `merge_method`, the mean by default) before the head.
    """

    def __init__(
        self,
        backbone: nn.Module,
        modalities: list[str],
        band_counts: list[int],
        out_channels: int,
        dim: int,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.modalities = modalities
        self.band_counts = band_counts
        self.out_channels = out_channels
        self.head = nn.Linear(dim, out_channels * PATCH_SIZE * PATCH_SIZE)

    def forward(self, source: torch.Tensor) -> torch.Tensor:
        n, bands, height, width = source.shape
        if bands != sum(self.band_counts) or height % PATCH_SIZE or width % PATCH_SIZE:
            raise ValueError(
                f"TerraMind takes {sum(self.band_counts)} band(s) ({self.modalities}) with sides "
                f"that are multiples of {PATCH_SIZE}, got {tuple(source.shape[1:])}"
            )
        parts = torch.split(source, self.band_counts, dim=1)
        tokens = self.backbone(dict(zip(self.modalities, parts, strict=True)))[-1]  # [N, L, D]
        grid_h, grid_w = height // PATCH_SIZE, width // PATCH_SIZE
        patches = self.head(tokens).transpose(1, 2).reshape(n, -1, grid_h, grid_w)
        return F.pixel_shuffle(patches, PATCH_SIZE)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each encoder block in the backward pass (the hook visiontune calls).

        The blocks stay where they are, so module names (and LoRA targets) do not change.
        """
        for block in self.backbone.encoder:
            block.__dict__.pop("forward", None)
            if enable:
                bound = type(block).forward.__get__(block)
                block.forward = functools.partial(checkpoint, bound, use_reentrant=False)


def _modality_names(modalities: list[Modality]) -> list[str]:
    names: list[str] = []
    for modality in modalities:
        names.extend(modality if isinstance(modality, dict) else [modality])
    return names


def _hub_checkpoint(name: str, hub_id: str, hub_filename: str | None) -> str:
    """Download a checkpoint from the hub; TerraMind 1.0 repos hold `TerraMind_v1_<size>.pt`."""
    from huggingface_hub import hf_hub_download

    size = name.removeprefix("terramind_v1_").split("_")[0]
    return hf_hub_download(hub_id, hub_filename or f"TerraMind_v1_{size}.pt")


def build(
    name: str = "terramind_v1_tiny",
    modalities: list[Modality] | None = None,
    band_counts: list[int] | None = None,
    out_channels: int = 3,
    pretrained: bool = False,
    hub_id: str | None = None,
    hub_filename: str | None = None,
    ckpt_path: str | None = None,
    **terratorch_args: Any,
) -> TerraMindTranslator:
    """A TerraMind encoder from terratorch's registry with a pixel head (see the module doc).

    modalities: pretrained names (S1RTC, S1GRD, S2L2A, S2L1C, RGB, DEM) or `{name: bands}` for
    a new modality; band_counts: bands of each in `source` (default: 2 for S1, 12 for S2L2A,
    13 for S2L1C, 3 for RGB, 1 for DEM); other keyword arguments go to terratorch
    (`img_size`, `merge_method`, `bands`, `modality_drop_rate`, ...).
    """
    if name.endswith(FULL_MODEL_SUFFIXES):
        raise ConfigError(
            [
                f"model.builder_args.name: {name} is one of terratorch's full models, which this "
                "builder does not train: `_generate` samples tokens and decodes them by diffusion "
                "(no gradient reaches its weights) and `_encdec` predicts tokens from embedding "
                "modules built in Python; use an encoder such as terramind_v1_base"
            ]
        )
    modalities = list(modalities or ["S1RTC"])
    names = _modality_names(modalities)
    counts = list(band_counts) if band_counts is not None else _default_band_counts(modalities)
    if len(counts) != len(names):
        raise ConfigError(
            [f"model.builder_args.band_counts: {counts} has {len(counts)} entries for {names}"]
        )
    registry = _registry()
    if name not in registry:
        known = sorted(n for n in registry if "terramind" in n and not n.endswith("tokenizer"))
        raise ConfigError(
            [
                f"model.builder_args.name: {name!r} is not in terratorch's registry; "
                f"TerraMind encoders: {', '.join(known)}"
            ]
        )
    if hub_id is not None:
        ckpt_path = _hub_checkpoint(name, hub_id, hub_filename)
    backbone = registry.build(
        name,
        modalities=modalities,
        pretrained=pretrained and ckpt_path is None,
        ckpt_path=ckpt_path,
        **terratorch_args,
    )
    dim = backbone.out_channels[-1]
    return TerraMindTranslator(backbone, names, counts, out_channels, dim)


_PRETRAINED_BANDS = {"s1rtc": 2, "s1grd": 2, "s2l2a": 12, "s2l1c": 13, "rgb": 3, "dem": 1}


def _default_band_counts(modalities: list[Modality]) -> list[int]:
    """Band counts of pretrained modality names; new modalities say theirs ({name: bands})."""
    counts: list[int] = []
    for modality in modalities:
        if isinstance(modality, dict):
            counts.extend(int(bands) for bands in modality.values())
            continue
        key = modality.lower().replace("sen2", "s2").replace("sen1", "s1")
        match = [bands for prefix, bands in _PRETRAINED_BANDS.items() if prefix in key]
        if not match:
            raise ConfigError(
                [
                    f"model.builder_args.modalities: no default band count for {modality!r}; "
                    "give model.builder_args.band_counts"
                ]
            )
        counts.append(match[0])
    return counts
