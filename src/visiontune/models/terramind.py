r"""TerraMind (IBM/ESA's geospatial foundation model) as a `model.builder` for image translation.

```yaml
model:
  builder: visiontune.models.terramind:build
  builder_args: {name: terramind_v1_tiny, modalities: [S1RTC], out_channels: 3, pretrained: true}
```

TerraMind's code lives in terratorch (`pip install 'visiontune[terratorch]'`, which needs
torchvision and timm). `build` takes a TerraMind model from terratorch's registries and turns
its patch tokens back into pixels with a linear head (one 16 x 16 patch of `out_channels` bands
per token), so `forward(source)` returns an image the size of the source:

- an encoder (`terramind_v1_tiny`, `_small`, `_base`, `_large`, the `_tim` variants; its
  `BACKBONE_REGISTRY`): the head reads the last encoder layer. Its attention is a fused
  `attn.qkv` Linear: LoRA targets `re:.*encoder\.\d+\.attn\.qkv$`.
- an encoder-decoder (`terramind_v1_<size>_encdec`, its `FULL_MODEL_REGISTRY`): the decoder's
  queries are TerraMind's mask token plus the positional and modality embedding of
  `target_modality`, and they attend to the encoded source through `cross_attn.q`, `.kv` and
  `.proj` in every decoder block: LoRA targets `re:.*cross_attn\.(q|kv|proj)$`. This is
  TerraMind's own any-to-any path with the token logits replaced by the pixel head.

The head is new and trained in full (`lora.modules_to_save: [head]`). Weights:
`pretrained: true` downloads terratorch's own checkpoint for the variant
(ibm-esa-geospatial/TerraMind-1.0-<size>); `hub_id` (+ `hub_filename`) names another hub
repository, `ckpt_path` a local file; otherwise the weights are random. Inputs are expected
standardised as in pretraining (for S1RTC in dB: mean [-10.93, -17.329], std [4.391, 4.459]).

`_generate` models are refused: they sample discrete tokens and decode them by diffusion, so no
gradient reaches their weights.
"""

from __future__ import annotations

import functools
import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from visiontune.errors import ConfigError

PATCH_SIZE = 16  # every TerraMind 1.0 model embeds 16 x 16 patches
DIMS = {"tiny": 192, "small": 384, "base": 768, "large": 1024}  # token width per size
Modality = str | dict[str, int]  # a pretrained modality name, or {new_name: band count}


def _registries() -> tuple[Any, Any]:
    """terratorch's BACKBONE_ and FULL_MODEL_REGISTRY, or an error that says how to get them."""
    try:
        from terratorch.registry import BACKBONE_REGISTRY, FULL_MODEL_REGISTRY
    except Exception as error:  # a torchvision built for another torch raises RuntimeError
        raise ConfigError(
            [
                "model.builder: visiontune.models.terramind:build needs the terratorch extra "
                "(pip install 'visiontune[terratorch]'), which needs torchvision and timm "
                f"working with this torch; importing terratorch failed: {error}"
            ]
        ) from error
    return BACKBONE_REGISTRY, FULL_MODEL_REGISTRY


class TerraMindTranslator(nn.Module):
    """TerraMind on the source image(s) and a per-patch linear head from its tokens to pixels.

    `forward(source)` takes [N, sum(band_counts), H, W] with H and W multiples of 16 and returns
    [N, out_channels, H, W]. Several input modalities share one `source` tensor, split along the
    bands in the order of `modalities`.
    """

    def __init__(
        self,
        terramind: nn.Module,
        modalities: list[str],
        band_counts: list[int],
        out_channels: int,
        dim: int,
    ) -> None:
        super().__init__()
        self.terramind = terramind
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
        parts = dict(
            zip(self.modalities, torch.split(source, self.band_counts, dim=1), strict=True)
        )
        grid = (height // PATCH_SIZE, width // PATCH_SIZE)
        patches = self.head(self.tokens(parts, grid)).transpose(1, 2)  # [N, C * 16 * 16, L]
        return F.pixel_shuffle(patches.reshape(n, -1, *grid), PATCH_SIZE)

    def tokens(self, parts: dict[str, torch.Tensor], grid: tuple[int, int]) -> torch.Tensor:
        """[N, grid_h * grid_w, dim] tokens, one per output patch in raster order."""
        raise NotImplementedError

    def blocks(self) -> list[nn.Module]:
        """The transformer blocks that activation checkpointing recomputes."""
        raise NotImplementedError

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each transformer block in the backward pass (the hook visiontune calls).

        The blocks stay where they are, so module names (and LoRA targets) do not change.
        """
        for block in self.blocks():
            block.__dict__.pop("forward", None)
            if enable:
                bound = type(block).forward.__get__(block)
                block.forward = functools.partial(checkpoint, bound, use_reentrant=False)


class EncoderTranslator(TerraMindTranslator):
    """A TerraMind encoder (`terramind_v1_<size>`); the head reads its last layer, with the
    modalities' tokens merged by terratorch's `merge_method` (the mean by default)."""

    def tokens(self, parts: dict[str, torch.Tensor], grid: tuple[int, int]) -> torch.Tensor:
        return self.terramind(parts)[-1]

    def blocks(self) -> list[nn.Module]:
        return list(self.terramind.encoder)


class EncoderDecoderTranslator(TerraMindTranslator):
    """TerraMind's encoder-decoder (`terramind_v1_<size>_encdec`): the decoder's queries (mask
    token + the target modality's positional and modality embedding) cross-attend to the encoded
    source, as in TerraMind's own generation, and the head reads the decoder's last layer."""

    def __init__(
        self,
        terramind: nn.Module,
        modalities: list[str],
        band_counts: list[int],
        out_channels: int,
        dim: int,
        source_keys: dict[str, str],
        target_key: str,
    ) -> None:
        super().__init__(terramind, modalities, band_counts, out_channels, dim)
        self.source_keys = source_keys  # modality name -> TerraMind's embedding key
        self.target_key = target_key

    def tokens(self, parts: dict[str, torch.Tensor], grid: tuple[int, int]) -> torch.Tensor:
        if grid[0] != grid[1]:
            raise ValueError(f"TerraMind's decoder embeds square grids of patches, got {grid}")
        tm = self.terramind
        embedded = [tm.encoder_embeddings[self.source_keys[m]](x) for m, x in parts.items()]
        source_emb = torch.cat([e["emb"] for e in embedded], dim=1)
        encoded = tm.forward_encoder(
            torch.cat([e["x"] for e in embedded], dim=1) + source_emb, encoder_mask=None
        )
        context = tm.decoder_proj_context(encoded) + source_emb
        first = next(iter(parts.values()))
        ids = torch.zeros(first.shape[0], *grid, dtype=torch.long, device=first.device)
        query_emb = tm.decoder_embeddings[self.target_key].forward_embed({"tensor": ids})["emb"]
        queries = tm.mask_token.expand(first.shape[0], query_emb.shape[1], -1) + query_emb
        return tm.forward_decoder(queries, context, encoder_mask=None, decoder_attention_mask=None)

    def blocks(self) -> list[nn.Module]:
        return [*self.terramind.encoder, *self.terramind.decoder]


def _modality_names(modalities: list[Modality]) -> list[str]:
    names: list[str] = []
    for modality in modalities:
        names.extend(modality if isinstance(modality, dict) else [modality])
    return names


def _size(name: str) -> str:
    """tiny/small/base/large from a registry name such as terramind_v1_base_encdec."""
    found = re.search(r"_(tiny|small|base|large)(_|$)", name)
    if found is None:
        raise ConfigError([f"model.builder_args.name: cannot tell the model size of {name!r}"])
    return found.group(1)


def _hub_checkpoint(name: str, hub_id: str, hub_filename: str | None) -> str:
    """Download a checkpoint from the hub; TerraMind 1.0 repos hold `TerraMind_v1_<size>.pt`."""
    from huggingface_hub import hf_hub_download

    return hf_hub_download(hub_id, hub_filename or f"TerraMind_v1_{_size(name)}.pt")


def build(
    name: str = "terramind_v1_tiny",
    modalities: list[Modality] | None = None,
    band_counts: list[int] | None = None,
    out_channels: int = 3,
    target_modality: str = "S2L2A",
    pretrained: bool = False,
    hub_id: str | None = None,
    hub_filename: str | None = None,
    ckpt_path: str | None = None,
    img_size: int = 224,
    **terratorch_args: Any,
) -> TerraMindTranslator:
    """A TerraMind model from terratorch's registries with a pixel head (see the module doc).

    modalities: pretrained names (S1RTC, S1GRD, S2L2A, S2L1C, RGB, DEM) or `{name: bands}` for
    a new modality; band_counts: bands of each in `source` (default: 2 for S1, 12 for S2L2A,
    13 for S2L1C, 3 for RGB, 1 for DEM); target_modality: whose decoder embedding the queries of
    an `_encdec` model carry (S2L2A for optical targets); img_size: the side the positional
    embeddings are built for; other keyword arguments go to terratorch (`merge_method`, `bands`,
    `modality_drop_rate`, `drop_path_rate_decoder`, ...).
    """
    if name.endswith("_generate"):
        raise ConfigError(
            [
                f"model.builder_args.name: {name} samples tokens and decodes them by diffusion, so "
                "no gradient reaches its weights; use an encoder (terramind_v1_base) or an "
                "encoder-decoder (terramind_v1_base_encdec)"
            ]
        )
    modalities = list(modalities or ["S1RTC"])
    names = _modality_names(modalities)
    counts = list(band_counts) if band_counts is not None else _default_band_counts(modalities)
    if len(counts) != len(names):
        raise ConfigError(
            [f"model.builder_args.band_counts: {counts} has {len(counts)} entries for {names}"]
        )
    backbones, full_models = _registries()
    if hub_id is not None:
        ckpt_path = _hub_checkpoint(name, hub_id, hub_filename)
    weights: dict[str, Any] = {
        "pretrained": pretrained and ckpt_path is None,
        "ckpt_path": ckpt_path,
    }
    if "tokenizer" not in name and name in backbones:
        encoder = backbones.build(
            name, modalities=modalities, img_size=img_size, **weights, **terratorch_args
        )
        return EncoderTranslator(encoder, names, counts, out_channels, encoder.out_channels[-1])
    if name.endswith("_encdec") and name in full_models:
        return _encoder_decoder(
            full_models,
            name,
            modalities,
            counts,
            out_channels,
            target_modality,
            img_size,
            weights | terratorch_args,
        )
    known = sorted(
        n.removeprefix("terratorch_")
        for registry in (backbones, full_models)
        for n in registry
        if "terramind" in n and "tokenizer" not in n and not n.endswith("_generate")
    )
    raise ConfigError(
        [
            f"model.builder_args.name: {name!r} is not in terratorch's registries; TerraMind "
            f"encoders and encoder-decoders: {', '.join(known)}"
        ]
    )


def _encoder_decoder(
    full_models: Any,
    name: str,
    modalities: list[Modality],
    counts: list[int],
    out_channels: int,
    target_modality: str,
    img_size: int,
    args: dict[str, Any],
) -> EncoderDecoderTranslator:
    """terratorch's `_encdec` needs its embedding modules built first, as its generator does."""
    from terratorch.models.backbones.terramind.model.modality_info import MODALITY_INFO
    from terratorch.models.backbones.terramind.model.terramind import (
        build_modality_embeddings,
        build_output_modality_embeddings,
    )

    dim = DIMS[_size(name)]
    sizes = {"img_size": img_size, "dim": dim, "patch_size": PATCH_SIZE}
    encoder_embeddings, source_keys = build_modality_embeddings(MODALITY_INFO, modalities, **sizes)
    decoder_embeddings, target_keys = build_output_modality_embeddings(
        MODALITY_INFO, [target_modality], **sizes
    )
    try:
        model = full_models.build(
            name,
            encoder_embeddings=encoder_embeddings,
            decoder_embeddings=decoder_embeddings,
            modality_info=MODALITY_INFO,
            **args,
        )
    except TypeError as error:
        if "pretrained_bands" not in str(error):
            raise
        # terratorch 1.2.11's tiny and small _encdec pass an argument their own class refuses
        raise ConfigError(
            [
                f"model.builder_args.name: terratorch cannot build {name} ({error}); "
                "terramind_v1_base_encdec and terramind_v1_large_encdec build"
            ]
        ) from error
    names = _modality_names(modalities)
    return EncoderDecoderTranslator(
        model, names, counts, out_channels, dim, source_keys, target_keys[target_modality]
    )


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
