"""Trainable parameters of SAM 3 LoRA setups, counted on the real architecture.

    python bench/sam3_params.py [--ranks 16 32 64]

Builds `Sam3Model` with transformers' default `Sam3Config` (the architecture of
`facebook/sam3`: 32-layer ViT at 1008 px, 24-layer CLIP text encoder, 6-layer DETR encoder and
decoder, 200 queries) on the meta device, so no weight is allocated and nothing is downloaded,
applies visiontune's LoRA per component as the example configs do, and prints the trainable
parameters per component and the bytes they and their AdamW moments take in fp32. These
counts are exact; activation memory, which dominates when the vision encoder is trained, is
not estimated here: it needs a GPU probe (`visiontune plan`), and none was lent to us.
"""

from __future__ import annotations

import argparse

import torch
from transformers import Sam3Config, Sam3Model

from visiontune.config.schema import LoraConfig
from visiontune.config.tasks import Sam3Options
from visiontune.models.sam3 import apply_sam3_lora

SETUPS = {
    "light (no vision LoRA)": ["detr_encoder", "detr_decoder", "mask_decoder", "text_projection"],
    "full (vision LoRA)": [
        "vision_encoder", "detr_encoder", "detr_decoder", "mask_decoder", "text_projection",
    ],
}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[16, 32, 64])
    args = parser.parse_args()
    with torch.device("meta"):
        total = sum(p.numel() for p in Sam3Model(Sam3Config()).parameters())
    print(f"Sam3Model (default Sam3Config): {total / 1e6:.1f} M parameters")
    print(f"{'setup':26s} {'rank':>4s} {'trainable':>12s} {'share':>7s} {'fp32+AdamW':>11s}")
    for name, components in SETUPS.items():
        for rank in args.ranks:
            with torch.device("meta"):
                model = Sam3Model(Sam3Config())
            lora = LoraConfig(rank=rank, alpha=2 * rank, targets="attention")
            wrapped = apply_sam3_lora(model, lora, Sam3Options(lora_on=components))
            trainable = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
            state_mb = trainable * 4 * 4 / 2**20  # weight, gradient, two AdamW moments
            print(
                f"{name:26s} {rank:4d} {trainable / 1e6:10.2f} M {trainable / total:7.2%} "
                f"{state_mb:9.0f} MB"
            )


if __name__ == "__main__":
    main()
