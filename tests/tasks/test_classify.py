"""ClassifyTask with tiny real transformers models: LoRA, loading by path, loss, eval, predict."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from PIL import Image
from torch.utils.data import DataLoader
from transformers import AutoConfig, AutoModelForImageClassification, ViTImageProcessorPil

from visiontune.config import load_config
from visiontune.config.schema import Config
from visiontune.data.imagefolder import build_splits
from visiontune.data.images import ImageSpec
from visiontune.engine.runner import Runner
from visiontune.errors import ConfigError
from visiontune.metrics.classification import classification_metrics
from visiontune.task import Batch, Skipped
from visiontune.tasks.classify import ClassifyTask

TINY_VIT = {
    "model_type": "vit",
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "image_size": 32,
    "patch_size": 8,
}
CLASSES = {"none": (0, 0, 0), "mild": (120, 40, 40), "severe": (250, 250, 250)}


def make_folder(root: Path, per_class: int = 4) -> Path:
    for name, colour in CLASSES.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (24 + i, 20), colour).save(root / name / f"{i}.png")
    return root


def task_for(tmp_path: Path, **sections: Any) -> ClassifyTask:
    raw: dict[str, Any] = {
        "model": {"config": TINY_VIT},
        "data": {"train": str(make_folder(tmp_path / "train")), "val_fraction": 0.25},
        "train": {"max_steps": 1, "micro_batch_size": 4},
        "lora": {"rank": 4},
        "output_dir": str(tmp_path / "runs"),
    }
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {"type": "classify"} if key == "task" else {}), **value}
    return ClassifyTask(Config.model_validate(raw))


def loader(task: ClassifyTask, split: str = "val") -> DataLoader:
    return DataLoader(task.datasets().get(split), batch_size=4, collate_fn=task.collate)


def test_lora_model_targets_attention_and_trains_the_head(tmp_path: Path) -> None:
    task = task_for(tmp_path)
    model = task.adapter().model
    assert isinstance(model, PeftModel)
    lora_layers = {n.split(".lora_A")[0] for n, _ in model.named_parameters() if "lora_A" in n}
    assert len(lora_layers) == 8  # 4 attention projections in each of 2 layers
    leaves = {name.rsplit(".", 1)[-1] for name in lora_layers}
    assert leaves == {"q_proj", "k_proj", "v_proj", "o_proj"}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("classifier.modules_to_save" in n for n in trainable)
    assert all("lora_" in n or "classifier" in n for n in trainable)
    assert model.config.id2label == {0: "mild", 1: "none", 2: "severe"}


def test_loss_is_a_sum_with_its_count_and_reaches_lora_under_checkpointing(
    tmp_path: Path,
) -> None:
    task = task_for(
        tmp_path,
        model={"gradient_checkpointing": True},
        task={"loss": {"type": "focal", "class_weights": "balanced"}},
    )
    model = task.adapter()
    model.train()
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    batch = next(iter(DataLoader(task.datasets().train, batch_size=5, collate_fn=task.collate)))
    out = task.loss(model(**batch.inputs), batch)
    assert out.count == 5 and out.loss_sum.ndim == 0 and torch.isfinite(out.loss_sum)
    out.loss_sum.backward()
    lora_grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_grads and all(g is not None and g.abs().sum() > 0 for g in lora_grads)


def test_evaluate_reports_metrics_and_draws_the_confusion_matrix(tmp_path: Path) -> None:
    task = task_for(tmp_path, task={"referable_from": "none"})
    cfg = task.cfg.model_copy(update={"eval": task.cfg.eval.model_copy(update={"batch_size": 4})})
    metrics = Runner(cfg, task.adapter()).evaluate(task, task.datasets().val)
    scalars = metrics.scalars
    for name in ("accuracy", "balanced_accuracy", "macro_f1", "loss", "sensitivity.severe"):
        assert name in scalars
    assert "referable.sensitivity" in scalars
    assert sum(map(sum, metrics.tables["confusion_matrix"])) == 3  # 25% of 4 per class
    (figure,) = task.save_figures(metrics, tmp_path / "figures")
    assert figure.name == "confusion_matrix.png" and Image.open(figure).size[0] > 300


def test_a_corrupt_image_is_skipped_and_collated_apart(tmp_path: Path) -> None:
    task = task_for(tmp_path)
    (tmp_path / "train" / "mild" / "9.png").write_bytes(b"\x89PNG broken")
    ds = task.datasets().train
    index = next(i for i, r in enumerate(ds.records) if r.sample_id == "mild/9.png")
    skipped = ds[index]
    assert isinstance(skipped, Skipped) and "9.png" in skipped.reason
    batch = task.collate([ds[0], skipped])
    assert isinstance(batch, Batch) and batch.ids == [ds.records[0].sample_id]
    assert batch.skipped == [skipped] and batch.inputs["pixel_values"].shape == (1, 3, 32, 32)
    empty = task.collate([skipped])
    assert len(empty) == 0 and empty.skipped == [skipped]


def test_model_saved_by_path_loads_with_its_image_processor(tmp_path: Path) -> None:
    config = AutoConfig.for_model(**TINY_VIT, num_labels=7)
    AutoModelForImageClassification.from_config(config).save_pretrained(tmp_path / "vit")
    processor = ViTImageProcessorPil(size={"height": 24, "width": 24}, image_mean=[0.4] * 3)
    processor.save_pretrained(tmp_path / "vit")
    task = task_for(tmp_path, model={"config": None, "name_or_path": str(tmp_path / "vit")})
    assert task.spec.size == 24 and task.spec.mean == (0.4, 0.4, 0.4)
    model = task.adapter().model
    assert model.config.num_labels == 3  # the 7-class head was replaced for our classes


def test_predict_returns_labels_probabilities_and_names_bad_files(tmp_path: Path) -> None:
    task = task_for(tmp_path)
    runner = Runner(task.cfg, task.adapter())
    good = tmp_path / "train" / "severe" / "0.png"
    bad = tmp_path / "bad.jpg"
    bad.write_text("no jpeg here")
    first, second = runner.predict(task, [{"image": good}, {"image": bad}], tmp_path)
    assert first["label"] in CLASSES and set(first["probabilities"]) == set(CLASSES)
    assert first["score"] == pytest.approx(max(first["probabilities"].values()))
    assert sum(first["probabilities"].values()) == pytest.approx(1.0)
    assert second["label"] is None and "bad.jpg" in second["error"]


def test_full_siglip_config_builds_with_lora(tmp_path: Path) -> None:
    vision = {k: v for k, v in TINY_VIT.items() if k != "model_type"}
    text = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
    inline = {"model_type": "siglip", "vision_config": vision, "text_config": text}
    task = task_for(tmp_path, model={"config": inline}, lora={"targets": "qv"})
    model = task.adapter()
    pixels = torch.zeros(2, 3, 32, 32)
    assert model(pixel_values=pixels)["logits"].shape == (2, 3)


def test_unknown_referable_class_is_a_config_error(tmp_path: Path) -> None:
    task = task_for(tmp_path, task={"referable_from": "moderate"})
    with pytest.raises(ConfigError, match="task.referable_from: 'moderate' is not one of"):
        task.datasets()


@pytest.mark.parametrize("name", ["dr_medsiglip.yaml", "dr_medsiglip_low_vram.yaml"])
def test_dr_examples_read_the_aptos_layout_and_name_real_metrics(tmp_path: Path, name: str) -> None:
    root = tmp_path / "aptos"
    (root / "train_images").mkdir(parents=True)
    grades = [0, 0, 0, 1, 2, 2, 3, 4, 4, 0] * 2
    for i, grade in enumerate(grades):
        Image.new("RGB", (30, 20), (grade * 50, 0, 0)).save(root / "train_images" / f"id{i}.png")
    lines = "".join(f"id{i},{g}\n" for i, g in enumerate(grades))
    (root / "train.csv").write_text("id_code,diagnosis\n" + lines)
    examples = Path(__file__).parents[2] / "examples"
    cfg = load_config(examples / name, [f"data.train={root / 'train.csv'}"])
    classes, splits = build_splits(cfg, ImageSpec(16, (0.5,) * 3, (0.5,) * 3))
    assert classes == ["none", "mild", "moderate", "severe", "proliferative"]
    assert sorted(splits.train.labels + splits.val.labels) == sorted(grades)
    probs = torch.eye(5)[torch.tensor(grades)]
    metrics = classification_metrics(
        probs, torch.tensor(grades), classes, classes.index("moderate")
    )
    assert set(cfg.acceptance) <= set(metrics.scalars)
