"""Workers, persistence and pinning change nothing a run computes: order, augmentation, resume
and the naming of corrupt samples are the same as with the main process decoding alone."""

from __future__ import annotations

import multiprocessing
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from tests.conftest import tiny_config
from tests.engine.test_loop import start_loop
from visiontune import api
from visiontune.config.schema import DataConfig
from visiontune.data.imagefolder import build_splits
from visiontune.data.images import resolve_image_spec
from visiontune.engine import checkpoint as ckpt
from visiontune.engine.loader import TrainLoader, loader_options, resolve_num_workers
from visiontune.engine.order import DataOrder
from visiontune.engine.state import WEIGHTS
from visiontune.runs.rundir import read_jsonl
from visiontune.tasks.classify import ClassifyTask


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(ckpt.latest_complete(run_dir / "checkpoints") / WEIGHTS))


def test_resume_mid_epoch_with_two_workers_and_the_cache_is_bit_exact(
    image_data: Path, tmp_path: Path
) -> None:
    # The reference decodes in the main process without a cache; the interrupted run uses two
    # persistent workers and the disk cache (filled in its first part, read after resuming).
    sections = dict(
        train={"micro_batch_size": 3, "grad_accum_steps": 2, "max_steps": 12, "seed": 3},
        lora={"rank": 4, "alpha": 8, "dropout": 0.1, "targets": "all-linear"},
        schedule={"type": "cosine", "warmup_steps": 3},
        eval={"every_steps": 4, "patience": 5},
        checkpoint={"every_steps": 100},
    )
    plain = {"train": str(image_data / "train"), "val": str(image_data / "val"),
             "preprocess": {"size": 16, "mean": [0.5] * 3, "std": [0.5] * 3},
             "augment": {"train": {"hflip": 0.5, "rotation": 10}}}  # fmt: skip
    # the reference also augments per sample, the parted run on the collated batch
    per_sample = {**plain, "num_workers": 0, "augment_on": "workers"}
    whole = tiny_config(image_data, tmp_path / "whole", data=per_sample,
                        **sections)  # fmt: skip
    api.train(whole)

    fed = {**plain, "num_workers": 2, "cache": "disk", "cache_dir": str(tmp_path / "cache")}
    parted = tiny_config(image_data, tmp_path / "parted", data=fed, **sections)
    first = start_loop(parted)
    for _ in range(5):
        first.optimizer_step()
        first.after_step()
    first.save_checkpoint()
    assert (first.state.epoch, first.state.batch_in_epoch) == (1, 2)
    del first

    second = start_loop(parted, resume=True)
    second.resume_from(ckpt.latest_complete(second.rundir.checkpoints))
    second.run()

    wa, wb = final_weights(tmp_path / "whole/tiny"), final_weights(tmp_path / "parted/tiny")
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name
    steps_whole = read_jsonl(tmp_path / "whole/tiny/metrics.jsonl")
    steps_parted = read_jsonl(tmp_path / "parted/tiny/metrics.jsonl")
    assert [r["loss"] for r in steps_whole] == [r["loss"] for r in steps_parted]
    entries = list((tmp_path / "cache").rglob("*.safetensors"))
    assert len(entries) == 23 + 12  # every train and val image once, not once per worker


def test_persistent_workers_still_augment_differently_every_epoch(
    image_data: Path, tmp_path: Path
) -> None:
    cfg = tiny_config(
        image_data, tmp_path,
        data={"train": str(image_data / "train"), "num_workers": 2, "persistent_workers": True,
              "preprocess": {"size": 16, "mean": [0.5] * 3, "std": [0.5] * 3},
              "augment": {"train": {"hflip": 0.5, "rotation": 30, "color_jitter": 0.3}}},
    )  # fmt: skip
    _, splits = build_splits(cfg, resolve_image_spec(cfg))
    dataset = splits.train
    order = DataOrder(list(range(len(dataset))), 5, seed=0)
    task = ClassifyTask(cfg)
    loader = TrainLoader(dataset, order, task.collate, cfg.data, torch.device("cpu"))

    seen: dict[int, dict[str, torch.Tensor]] = {}
    workers: list[list[int]] = []
    for epoch in (0, 1, 2):
        batches = [task.augment(b) for b in loader.epoch(epoch)]  # augment_on: device
        workers.append([w.pid for w in loader.loader._iterator._workers])  # type: ignore[union-attr]
        seen[epoch] = {i: b.inputs["pixel_values"][k] for b in batches for k, i in enumerate(b.ids)}
    assert workers[0] == workers[1] == workers[2]  # the same processes every epoch
    reference = ClassifyTask(cfg.model_copy(update={"data": cfg.data.model_copy(
        update={"num_workers": 0})})).datasets().train  # fmt: skip
    for epoch, pixels in seen.items():
        assert len(pixels) == len(dataset)
        reference.set_epoch(epoch)
        for index in range(len(reference)):
            sample = reference[index]
            assert torch.equal(pixels[sample["id"]], sample["pixel_values"]), (epoch, index)
    changed = [i for i in seen[0] if not torch.equal(seen[0][i], seen[1][i])]
    assert len(changed) == len(dataset)  # colour jitter and rotation differ for every sample


def test_corrupt_images_are_counted_and_named_with_workers(
    image_data: Path, tmp_path: Path
) -> None:
    root = tmp_path / "data"
    shutil.copytree(image_data, root)
    for i, path in enumerate(sorted((root / "train/b").glob("*.png"))[:2]):
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(30 + i))
    cfg = tiny_config(
        root, tmp_path / "runs", train={"epochs": 2, "max_steps": None, "micro_batch_size": 4},
        data={"train": str(root / "train"), "val": str(root / "val"), "num_workers": 2,
              "preprocess": {"size": 16, "mean": [0.5] * 3, "std": [0.5] * 3}},
    )  # fmt: skip
    result = api.train(cfg)
    assert result.summary["skipped_samples"] == 4  # two files, two epochs
    log = (tmp_path / "runs/tiny/train.log").read_text()
    assert log.count("skipped sample b/b_0.png") == 2 and log.count("skipped sample b/b_1.png") == 2
    assert "data: 2 worker processes (kept across epochs)" in log


def _auto_in_daemon(queue: multiprocessing.Queue) -> None:
    queue.put(resolve_num_workers("auto"))


def test_auto_workers_leave_one_core_and_none_where_children_cannot_start() -> None:
    cores = len(os.sched_getaffinity(0))
    assert resolve_num_workers("auto") == max(0, min(cores - 1, 8))
    assert resolve_num_workers(3) == 3
    queue: multiprocessing.Queue = multiprocessing.Queue()
    daemon = multiprocessing.Process(target=_auto_in_daemon, args=(queue,), daemon=True)
    daemon.start()
    daemon.join(30)
    assert queue.get(timeout=5) == 0


def test_memory_is_pinned_only_for_cuda() -> None:
    data = DataConfig.model_validate({"train": ".", "num_workers": 2, "prefetch_factor": 4})
    assert loader_options(data, torch.device("cuda"), persistent=True) == {
        "num_workers": 2, "pin_memory": True, "prefetch_factor": 4, "persistent_workers": True,
    }  # fmt: skip
    assert loader_options(data, torch.device("cpu"), persistent=False)["pin_memory"] is False
    unpinned = data.model_copy(update={"pin_memory": False, "num_workers": 0})
    assert loader_options(unpinned, torch.device("cuda"), persistent=True) == {
        "num_workers": 0, "pin_memory": False,
    }  # fmt: skip
