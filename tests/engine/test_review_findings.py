"""Regression tests for the engine review of c1fb70d (/work/shared/reviews/engine-review.md).

One test (or a few) per finding; each fails on c1fb70d. Expected values come from the
review's description of correct behaviour, from hand-known initial values, or from files the
code under test does not produce (the source run's best/ weights, a checkpoint on disk).
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from tests.conftest import TINY_VIT, tiny_config
from tests.engine.test_loop import start_loop
from visiontune import api
from visiontune.config.load import load_config
from visiontune.config.schema import Config
from visiontune.engine import checkpoint as ckpt
from visiontune.engine.state import WEIGHTS
from visiontune.errors import ConfigError, TrainingError
from visiontune.tasks.classify import ClassifyMeter, ClassifyTask


def read_strict_jsonl(path: Path) -> list[dict[str, Any]]:
    """Every line through a strict JSON parser: NaN and Infinity are not JSON."""

    def refuse(constant: str) -> Any:
        raise ValueError(f"{path}: non-JSON constant {constant}")

    lines = [line for line in path.read_text().splitlines() if line.strip()]
    return [json.loads(line, parse_constant=refuse) for line in lines]


def weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / WEIGHTS))


def step_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step-{step:08d}"


def manifest_step(directory: Path) -> int:
    return json.loads((directory / ckpt.MANIFEST).read_text())["step"]


def with_train(cfg: Config, **changes: Any) -> Config:
    return cfg.model_copy(update={"train": cfg.train.model_copy(update=changes)})


def with_data(cfg: Config, **changes: Any) -> Config:
    return cfg.model_copy(update={"data": cfg.data.model_copy(update=changes)})


def with_optim(cfg: Config, **changes: Any) -> Config:
    return cfg.model_copy(update={"optim": cfg.optim.model_copy(update=changes)})


# ---- finding 1: init_from on a first --resume job ------------------------------------------


def test_f01_first_resume_job_starts_from_init_from_weights(
    image_data: Path, tmp_path: Path
) -> None:
    source = tiny_config(image_data, tmp_path / "src", train={"max_steps": 3})
    api.train(source)
    source_best = weights(tmp_path / "src/tiny/best")
    # the source trained: its LoRA B matrices left their zero initialisation, so a run that
    # started from the base model instead would not match them
    lora_b = [t for name, t in source_best.items() if "lora_B" in name]
    assert lora_b and any(t.abs().max() > 1e-4 for t in lora_b)

    follower = tiny_config(
        image_data, tmp_path / "dst", train={"max_steps": 1}, optim={"lr": 1e-12},
        init_from=str(tmp_path / "src/tiny"),
    )  # fmt: skip
    api.train(follower, resume=True)  # a new run: --resume finds no checkpoint
    first = weights(step_dir(tmp_path / "dst/tiny", 1))
    assert first.keys() == source_best.keys()
    for name, tensor in source_best.items():
        # one step at lr 1e-12 moves a weight by about 1e-12
        torch.testing.assert_close(first[name], tensor, rtol=0, atol=1e-9, msg=name)
    log = (tmp_path / "dst/tiny/train.log").read_text()
    assert "init_from: loaded WEIGHTS ONLY" in log


# ---- finding 5: changed optimizer settings on resume are applied ---------------------------


def test_f05_resume_applies_a_changed_lr_weight_decay_and_betas(
    image_data: Path, tmp_path: Path
) -> None:
    cfg = tiny_config(
        image_data, tmp_path, train={"max_steps": 2}, checkpoint={"every_steps": 1},
        optim={"lr": 0.01, "weight_decay": 0.01, "betas": (0.9, 0.999)},
    )  # fmt: skip
    api.train(cfg)
    lowered = with_train(
        with_optim(cfg, lr=1e-5, weight_decay=0.05, betas=(0.8, 0.99)), max_steps=4
    )
    api.train(lowered, resume=True)
    run = tmp_path / "tiny"
    steps = read_strict_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert [r["lr"] for r in steps] == pytest.approx([0.01, 0.01, 1e-5, 1e-5], rel=1e-9)

    groups = ckpt.load_torch(step_dir(run, 4) / "optimizer.pt")["param_groups"]
    for group in groups:
        assert tuple(group["betas"]) == (0.8, 0.99)
        assert group["weight_decay"] == (0.05 if group["decay"] else 0.0)
    # the update itself is lr-sized: Adam moves a weight by about lr per step
    before, after = weights(step_dir(run, 3)), weights(step_dir(run, 4))
    moved = max(float((after[n] - before[n]).abs().max()) for n in before)
    assert 0 < moved < 1e-3

    log = (run / "train.log").read_text()
    assert "applied: optim.lr (0.01 -> 1e-05)" in log
    assert "applied: optim.weight_decay (0.01 -> 0.05)" in log


# ---- finding 6: resume refuses a changed train split ---------------------------------------


def test_f06_resume_refuses_a_changed_holdout_or_class_order_but_not_harmless_changes(
    image_data: Path, tmp_path: Path
) -> None:
    cfg = tiny_config(image_data, tmp_path, train={"max_steps": 2})
    cfg = with_data(cfg, val=None, val_fraction=0.3)
    api.train(cfg)
    # Grouping the hold-out by image number ("a/a_3.png" -> "3") holds out whole groups: the
    # same 6 of 23 images are held out in count, but not the same images.
    grouped = with_data(cfg, group_pattern=r"_(\d+)\.png$")
    with pytest.raises(TrainingError, match="train samples"):
        api.train(with_train(grouped, max_steps=3), resume=True)
    reordered = with_data(cfg, classes=["c", "b", "a"])
    with pytest.raises(TrainingError, match="train samples"):
        api.train(with_train(reordered, max_steps=3), resume=True)
    result = api.train(with_train(cfg, max_steps=3), resume=True)
    assert result.state.step == 3
    assert "resumed from" in (tmp_path / "tiny/train.log").read_text()


# ---- finding 10: a best/ newer than the checkpoint resumed from -----------------------------


def scripted_metric(monkeypatch: pytest.MonkeyPatch, values: list[float | None]) -> None:
    """Each evaluation reports the next of `values` as `scripted` (None: leaves it out)."""
    compute = ClassifyMeter.compute
    calls = iter(values)

    def patched(self: ClassifyMeter) -> Any:
        metrics = compute(self)
        value = next(calls)
        if value is not None:
            metrics.scalars["scripted"] = value
        return metrics

    monkeypatch.setattr(ClassifyMeter, "compute", patched)


def test_f10_resume_sets_aside_a_best_from_the_lost_steps_and_rebuilds_it(
    image_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # evaluations at steps 1, 2, 3 improve every time; after the resume step 3 is worse
    scripted_metric(monkeypatch, [1.0, 2.0, 3.0, 0.0])
    cfg = tiny_config(
        image_data, tmp_path, train={"max_steps": 3}, checkpoint={"every_steps": 2},
        eval={"every_steps": 1, "metric": "scripted", "mode": "max"},
    )  # fmt: skip
    api.train(cfg)
    run = tmp_path / "tiny"
    assert manifest_step(run / "best") == 3
    best_of_step_3 = weights(run / "best")
    # the crash: the save at step 3 was lost, best/ of step 3 was not
    for path in sorted(step_dir(run, 3).rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    step_dir(run, 3).rmdir()

    api.train(cfg, resume=True)
    aside = run / "best.lost-step-3"
    assert manifest_step(aside) == 3
    kept = weights(aside)
    assert kept.keys() == best_of_step_3.keys()
    assert all(torch.equal(kept[n], best_of_step_3[n]) for n in kept)
    # best/ is the checkpoint of the best step that survived (step 2), untouched by the
    # resumed step 3, which did not improve
    assert manifest_step(run / "best") == 2
    rebuilt, source = weights(run / "best"), weights(step_dir(run, 2))
    assert rebuilt.keys() == source.keys()
    assert all(torch.equal(rebuilt[n], source[n]) for n in source)
    assert not all(torch.equal(rebuilt[n], best_of_step_3[n]) for n in source)


# ---- finding 12: evaluation cadence does not change the trajectory --------------------------


def test_f12_eval_cadence_does_not_change_training_under_dropout(
    image_data: Path, tmp_path: Path
) -> None:
    final = {}
    for every in (None, 1):
        cfg = tiny_config(
            image_data, tmp_path / str(every), train={"max_steps": 4},
            lora={"rank": 4, "alpha": 8, "dropout": 0.1, "targets": "all-linear"},
            eval={"every_steps": every},
        )  # fmt: skip
        api.train(cfg)
        final[every] = weights(step_dir(tmp_path / str(every) / "tiny", 4))
    assert final[None].keys() == final[1].keys()
    for name in final[None]:
        assert torch.equal(final[None][name], final[1][name]), name


# ---- finding 15: frozen BatchNorm statistics ------------------------------------------------

TINY_RESNET = {
    "model_type": "resnet",
    "embedding_size": 8,
    "hidden_sizes": [8, 16],
    "depths": [1, 1],
    "num_channels": 3,
}


def test_f15_frozen_batchnorm_statistics_do_not_drift(image_data: Path, tmp_path: Path) -> None:
    # The only Linear of a ResNet classifier is its head: LoRA on it, the conv backbone frozen.
    cfg = tiny_config(
        image_data, tmp_path, model={"config": TINY_RESNET}, train={"max_steps": 3},
        lora={"rank": 2, "alpha": 4, "dropout": 0.0, "targets": ["classifier.1"],
              "modules_to_save": []},
    )  # fmt: skip
    loop = start_loop(cfg)
    model = loop.runner.adapter
    norms = {n: m for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    assert len(norms) >= 5  # embedder, and per stage shortcut and layer norms
    assert not any(p.requires_grad for m in norms.values() for p in m.parameters())
    loop.run()
    assert loop.state.step == 3
    for name, norm in norms.items():
        # a freshly built BatchNorm has mean 0, variance 1 and has tracked no batch
        assert torch.equal(norm.running_mean, torch.zeros_like(norm.running_mean)), name
        assert torch.equal(norm.running_var, torch.ones_like(norm.running_var)), name
        assert int(norm.num_batches_tracked) == 0, name
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().max() > 0 for p in lora_b)  # zero at initialisation


# ---- finding 16: fp16 overflow records ------------------------------------------------------


def test_f16_fp16_overflow_is_strict_json_and_counted(
    image_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a loss scale far above fp16's range: the first steps overflow and are skipped (each
    # skip halves the scale) until the scale fits, then updates are applied
    monkeypatch.setattr(
        torch.amp, "GradScaler", functools.partial(torch.amp.GradScaler, init_scale=2.0**18)
    )
    cfg = tiny_config(
        image_data, tmp_path, model={"config": TINY_VIT, "dtype": "fp16"}, precision="fp16",
        train={"max_steps": 6},
    )  # fmt: skip
    api.train(cfg)
    steps = read_strict_jsonl(tmp_path / "tiny/metrics.jsonl")
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    skipped = [r for r in steps if not r["update_applied"]]
    applied = [r for r in steps if r["update_applied"]]
    assert skipped and applied
    for record in skipped:  # an overflowed gradient has no finite norm to report
        assert record["grad_norm"] is None
    for record in applied:
        assert 0 < record["grad_norm"] < math.inf
    summary = json.loads((tmp_path / "tiny/summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["steps"] == 6
    assert summary["updates_applied"] == len(applied) < 6


# ---- findings 11 and 19: config rules and defaults ------------------------------------------


def minimal_raw(**sections: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "model": {"config": TINY_VIT},
        "data": {"train": "train"},
        "train": {"max_steps": 1},
    }
    return {**raw, **sections}


def test_f11_fp32_precision_with_a_bf16_base_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "cfg.yaml"
    raw = minimal_raw(precision="fp32", model={"config": TINY_VIT, "dtype": "bf16"})
    path.write_text(json.dumps(raw))  # JSON is YAML
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert "precision" in message and "model.dtype" in message


def test_f19_defaults_are_safe() -> None:
    cfg = Config.model_validate(minimal_raw())
    assert cfg.precision == "auto"
    every = cfg.checkpoint.every_steps
    assert isinstance(every, int) and every >= 1


def test_f19_patience_needs_periodic_evaluation() -> None:
    with pytest.raises(ValueError, match="every_steps"):
        Config.model_validate(minimal_raw(eval={"patience": 3}))
    cfg = Config.model_validate(minimal_raw(eval={"patience": 3, "every_steps": 10}))
    assert cfg.eval.patience == 3


@pytest.mark.parametrize(
    ("section", "mode"),
    [
        ({"metric": "loss"}, "min"),
        ({"metric": "distance"}, "min"),
        ({"metric": "accuracy"}, "max"),
        ({}, "max"),
        ({"metric": "loss", "mode": "max"}, "max"),
        ({"metric": "accuracy", "mode": "min"}, "min"),
    ],
)
def test_f19_eval_mode_is_inferred_from_the_metric_unless_set(
    section: dict[str, str], mode: str
) -> None:
    assert Config.model_validate(minimal_raw(eval=section)).eval.mode == mode


# ---- finding 7: a selection metric missing at one evaluation --------------------------------


def test_f07_missing_selection_metric_counts_as_no_improvement(
    image_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    scripted_metric(monkeypatch, [None, 0.5])
    cfg = tiny_config(
        image_data, tmp_path, train={"max_steps": 2},
        eval={"every_steps": 1, "metric": "scripted", "mode": "max"},
    )  # fmt: skip
    result = api.train(cfg)
    assert result.state.step == 2
    evals = read_strict_jsonl(tmp_path / "tiny/eval.jsonl")
    assert [r["step"] for r in evals] == [1, 2]
    assert "scripted" not in evals[0] and evals[1]["scripted"] == 0.5
    assert manifest_step(tmp_path / "tiny/best") == 2
    summary = json.loads((tmp_path / "tiny/summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["best"] == {"metric": "scripted", "value": 0.5, "step": 2}


# ---- a crash after training started leaves a trace ------------------------------------------


def test_a_failure_at_step_2_is_recorded_in_log_summary_and_ledger(
    image_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loss = ClassifyTask.loss
    calls = {"n": 0}

    def failing(self: ClassifyTask, outputs: Any, batch: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("injected failure in the loss")
        return loss(self, outputs, batch)

    monkeypatch.setattr(ClassifyTask, "loss", failing)
    cfg = tiny_config(image_data, tmp_path, train={"max_steps": 4})
    with pytest.raises(RuntimeError, match="injected failure"):
        api.train(cfg)
    run = tmp_path / "tiny"
    assert "injected failure in the loss" in (run / "train.log").read_text()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "failed"
    assert "injected failure in the loss" in summary["error"]
    assert summary["steps"] == 1
    ledger = read_strict_jsonl(tmp_path / "ledger.jsonl")
    assert [(e["name"], e["status"]) for e in ledger] == [("tiny", "failed")]
