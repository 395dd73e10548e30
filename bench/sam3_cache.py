"""Speed-up of the frozen-trunk cache for SAM 3: epochs 2+ with and without cached ViT output.

    python bench/sam3_cache.py [--width 192] [--layers 6] [--image-size 224] [--images 8]
        [--epochs 3] [--batch-size 4] [--threads N]

The workload is examples/crack_sam3_lora_light.yaml's setup (LoRA on the DETR encoder and
decoder and the mask decoder, vision encoder frozen, set-prediction loss) on the tiny twin's
architecture (examples/tiny/crack_sam3_tiny.yaml) with a wider, deeper ViT trunk so that the
trunk costs what it costs relative to the heads in the real model (32 layers, width 1024, at
1008 px, cannot be trained on a CPU in a benchmark's time). Data are synthetic cracks
(visiontune.data.synthetic_cracks). Both modes train the same seeded run through
`visiontune.api.train`; epoch time is the sum of the engine's own `step_time_s`
(metrics.jsonl) over the epoch. Epoch 1 fills the cache, so the figure to read is the mean of
epochs 2+ without the cache over the same with it; the median step time of epochs 2+ is the
figure printed, as it is robust to a machine shared with other work (the sum per epoch is
printed too).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch

from visiontune import api
from visiontune.config.load import load_config
from visiontune.data.synthetic_cracks import generate
from visiontune.runs.rundir import RunDir, read_jsonl

ROOT = Path(__file__).resolve().parents[1]


def step_seconds(run_dir: Path) -> list[float]:
    records = read_jsonl(RunDir(run_dir).metrics)
    return [r["step_time_s"] for r in records if "step_time_s" in r]


def epoch_seconds(times: list[float], steps_per_epoch: int) -> list[float]:
    return [
        sum(times[e * steps_per_epoch : (e + 1) * steps_per_epoch])
        for e in range(len(times) // steps_per_epoch)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=192)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    steps = -(-args.images // args.batch_size)
    side = args.image_size // 14
    backbone = "model.config.vision_config.backbone_config"
    with tempfile.TemporaryDirectory() as tmp:
        data = generate(Path(tmp) / "data", args.images, 96, widths=(4, 5))
        results = {}
        for mode in ("off", "memory"):
            cfg = load_config(
                ROOT / "examples/tiny/crack_sam3_tiny.yaml",
                [
                    f"data.train={data / 'train'}",
                    "data.val=null",
                    f"output_dir={Path(tmp) / 'runs'}",
                    f"name=cache-{mode}",
                    f'task.cache="{mode}"',
                    "task.sam3.lora_on=[detr_encoder, detr_decoder, mask_decoder, text_projection]",
                    "task.sam3.train_fully=[]",
                    "lora.targets=attention",
                    f"{backbone}.hidden_size={args.width}",
                    f"{backbone}.intermediate_size={4 * args.width}",
                    f"{backbone}.num_hidden_layers={args.layers}",
                    f"{backbone}.num_attention_heads={max(2, args.width // 64)}",
                    f"{backbone}.image_size={args.image_size}",
                    f"{backbone}.pretrain_image_size={args.image_size}",
                    f"{backbone}.global_attn_indexes=[{args.layers - 1}]",
                    f"model.config.vision_config.backbone_feature_sizes=[[{4 * side}, "
                    f"{4 * side}], [{2 * side}, {2 * side}], [{side}, {side}]]",
                    f"train.micro_batch_size={args.batch_size}",
                    f"train.max_steps={steps * args.epochs}",
                    "eval.every_steps=null",
                    "train.log_every=1000",
                ],
            )
            result = api.train(cfg)
            results[mode] = step_seconds(result.run_dir)
    print(
        f"trunk: {args.layers} ViT layers, width {args.width}, {args.image_size} px; "
        f"{args.images} images, micro-batch {args.batch_size}, threads "
        f"{torch.get_num_threads()}"
    )
    for mode, times in results.items():
        epochs = [round(s, 2) for s in epoch_seconds(times, steps)]
        print(f"  cache {mode:6s} seconds per epoch: {epochs}")
    later = {m: statistics.median(t[steps:]) for m, t in results.items()}
    print(
        f"epochs 2+, median step: no cache {later['off']:.3f}s, cache "
        f"{later['memory']:.3f}s, speed-up x{later['off'] / later['memory']:.2f}"
    )


if __name__ == "__main__":
    main()
