"""Training a model defined only in this test folder (`model.builder`) on copies of the real
tiles: LoRA on its cross-attention by regex, weighted loss terms logged raw and weighted,
clear errors for broken user code, exact resume, init_from, the dtype rules, checkpointing,
and prediction to a georeferenced GeoTIFF."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from safetensors.torch import load_file

from tests.engine.test_loop import start_loop
from tests.translate.tiles import VAL, translate_config
from visiontune import api
from visiontune.engine import checkpoint as ckpt
from visiontune.errors import ConfigError, TrainingError, VisiontuneError

SMALL = {"crop_size": 64, "tile_overlap": 8}  # 16 windows per 224 px tile


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_lora_by_regex_only_on_cross_attention_with_the_head_trained_fully(tiles: Path) -> None:
    cfg = translate_config(tiles, tiles / "runs")
    adapter = api.make_task(cfg).adapter()
    trainable = {n for n, p in adapter.named_parameters() if p.requires_grad}
    lora = {
        n.split(".base_model.model.")[-1].rsplit(".lora_", 1)[0] for n in trainable if "lora_" in n
    }
    assert lora == {"cross_attn.q", "cross_attn.kv", "cross_attn.proj"}
    assert all("lora_" in n or ".head.modules_to_save." in n for n in trainable)
    assert all(p.dtype == torch.float32 for p in adapter.parameters() if p.requires_grad)


def test_weighted_terms_are_logged_and_the_val_tile_is_scored_and_predicted(tiles: Path) -> None:
    losses = [
        {"name": "l1", "weight": 2.0},
        {"name": "ssim", "weight": 0.5},
        {
            "fn": "user_code_for_tests:plain_l1",
            "weight": 0.25,
            "args": {"scale": 3.0},
            "label": "mine",
        },
    ]
    cfg = translate_config(tiles, tiles / "runs", task={**SMALL, "losses": losses})
    result = api.train(cfg)
    assert result.summary["status"] == "completed"
    steps = records(result.run_dir / "metrics.jsonl")
    for step in steps:
        assert step["loss.l1.weighted"] == pytest.approx(2.0 * step["loss.l1"], rel=1e-5)
        assert step["loss.ssim.weighted"] == pytest.approx(0.5 * step["loss.ssim"], rel=1e-5)
        # the user's term is 3 x the same masked L1, written out by hand in the test folder
        assert step["loss.mine"] == pytest.approx(3.0 * step["loss.l1"], rel=1e-4)
        weighted = [step[f"loss.{t}.weighted"] for t in ("l1", "ssim", "mine")]
        assert step["loss"] == pytest.approx(sum(weighted), rel=1e-5)
    final = records(result.run_dir / "eval.jsonl")[-1]
    assert {"psnr", "ssim", "baseline_psnr", "psnr.band2", "loss.mine.weighted"} <= set(final)
    assert (result.run_dir / "figures" / f"translate_{VAL}.png").is_file()
    assert (result.run_dir / "figures" / "training_curves.png").is_file()
    check_prediction(result.run_dir, tiles)
    check_export(result.run_dir, tiles / "export")


def check_export(run: Path, out: Path) -> None:
    """The merged export loads into a freshly built module and computes what the run does."""
    from user_code_for_tests import tiny_translator

    from visiontune.export import export_merged

    export_merged(run, out)
    recipe = json.loads((out / "builder.json").read_text())
    module = tiny_translator(**recipe["builder_args"])
    module.load_state_dict(load_file(out / "model.safetensors"))
    source = torch.randn(1, 2, 32, 32)
    expected = api.load_run(run).runner.adapter(source=source)["prediction"]
    assert torch.allclose(module(source), expected, atol=1e-5)
    card = (out / "README.md").read_text()
    assert "library_name: pytorch" in card and "user_code_for_tests:tiny_translator" in card


def check_prediction(run: Path, tiles: Path) -> None:
    """Predict writes a GeoTIFF placed where its source is, a quick-look and a figure, and
    refuses to overwrite them."""
    source = tiles / "val" / "S1RTC" / f"{VAL}.tif"
    out = tiles / "predictions"
    record = api.predict(run, [{"image": str(source)}], out)[0]
    assert record["georeferenced"] and record["psnr"] > 0
    written = tifffile.imread(record["prediction"])
    assert written.shape == (224, 224, 3) and written.dtype == np.float32
    geo = ("ModelTiepointTag", "ModelPixelScaleTag", "GeoKeyDirectoryTag", "GeoAsciiParamsTag")
    with tifffile.TiffFile(record["prediction"]) as made, tifffile.TiffFile(source) as original:
        for tag in geo:
            assert made.pages[0].tags[tag].value == original.pages[0].tags[tag].value
    assert (out / f"{VAL}.png").is_file() and (out / f"{VAL}_compare.png").is_file()
    with pytest.raises(VisiontuneError, match=f"{VAL}.tif exists"):
        api.predict(run, [{"image": str(source)}], out)


def test_a_builder_that_cannot_be_imported_names_the_path_and_the_error(tiles: Path) -> None:
    cfg = translate_config(
        tiles, tiles / "runs", model={"builder": "no_such_pkg.models:build", "builder_args": {}}
    )
    with pytest.raises(ConfigError) as err:
        api.make_task(cfg).adapter()
    message = str(err.value)
    assert "model.builder: cannot import 'no_such_pkg.models'" in message
    assert "ModuleNotFoundError: No module named 'no_such_pkg'" in message
    cfg = translate_config(
        tiles, tiles / "runs", model={"builder": "user_code_for_tests:nope", "builder_args": {}}
    )
    with pytest.raises(ConfigError, match="has no 'nope'"):
        api.make_task(cfg).adapter()
    cfg = translate_config(
        tiles,
        tiles / "runs",
        model={"builder": "user_code_for_tests:not_a_module", "builder_args": {}},
    )
    with pytest.raises(ConfigError, match="returned a str, not a torch.nn.Module"):
        api.make_task(cfg).adapter()


def test_a_loss_function_that_cannot_be_imported_is_named(tiles: Path) -> None:
    cfg = translate_config(
        tiles, tiles / "runs", task={"losses": [{"fn": "user_code_for_tests:gone"}]}
    )
    with pytest.raises(
        ConfigError, match=r"task.losses\[0\].fn: module 'user_code_for_tests' has no 'gone'"
    ):
        _ = api.make_task(cfg).terms


@pytest.mark.parametrize(
    ("term", "expected"),
    [
        ("scalar_loss", r"loss term 'scalar_loss' .* returned \(\); .* shape \(4,\)"),
        ("nan_loss", r"loss is not finite at optimizer step 1 \(epoch 0, terms nan_loss, "),
    ],
)
def test_a_user_loss_of_the_wrong_shape_or_nan_names_its_term(
    tiles: Path, term: str, expected: str
) -> None:
    cfg = translate_config(
        tiles, tiles / "runs", task={"losses": [{"fn": f"user_code_for_tests:{term}"}]}
    )
    with pytest.raises(TrainingError, match=expected):
        api.train(cfg)


def test_detect_anomaly_names_the_backward_op(tiles: Path) -> None:
    cfg = translate_config(
        tiles,
        tiles / "runs",
        train={"detect_anomaly": True},
        task={"losses": [{"fn": "user_code_for_tests:sqrt_at_zero"}]},
    )
    with pytest.raises(RuntimeError, match="Function 'PowBackward0' returned nan values"):
        api.train(cfg)


def test_resume_is_exact_and_init_from_loads_the_weights(tiles: Path) -> None:
    # 4 tiles x 3 crops, micro-batch 4 -> 3 micro-batches; accumulation 2 -> 2 steps per
    # epoch. Stopping after step 3 is mid-epoch: the crops drawn after resume must match.
    sections = {
        "data": {"val": None},
        "task": {"crops_per_tile": 3},
        "train": {"max_steps": 5, "grad_accum_steps": 2},
        "schedule": {"warmup_steps": 2},
    }
    whole = translate_config(tiles, tiles / "whole", **sections)
    api.train(whole)
    parted = whole.model_copy(update={"output_dir": tiles / "parted"})
    first = start_loop(parted)
    for _ in range(3):
        first.optimizer_step()
    first.save_checkpoint()
    second = start_loop(parted, resume=True)
    second.resume_from(ckpt.latest_complete(second.rundir.checkpoints))
    second.run()
    final = "translate/checkpoints/step-00000005/trainable.safetensors"
    a, b = load_file(tiles / "whole" / final), load_file(tiles / "parted" / final)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = [r["loss"] for r in records(tiles / "whole/translate/metrics.jsonl")]
    assert losses == [r["loss"] for r in records(tiles / "parted/translate/metrics.jsonl")]

    warm = translate_config(
        tiles, tiles / "warm", init_from=str(tiles / "whole/translate"), **sections
    )
    run = api.RunDir.prepare(warm.run_dir, resume=False, overwrite=False)
    loop = api.prepare_loop(warm, run, False, api.StopRequest(None))
    run.release()
    assert loop is not None
    state = {n: p for n, p in loop.runner.adapter.named_parameters() if p.requires_grad}
    assert state.keys() == a.keys() and all(torch.equal(state[k], a[k]) for k in a)


def test_bf16_base_keeps_trainables_fp32_and_checkpointing_keeps_gradients(tiles: Path) -> None:
    cfg = translate_config(tiles, tiles / "runs", model={"dtype": "bf16"}, precision="bf16")
    adapter = api.make_task(cfg).adapter()
    dtypes = {(p.requires_grad, p.dtype) for p in adapter.parameters()}
    assert dtypes == {(True, torch.float32), (False, torch.bfloat16)}
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        cfg = translate_config(
            tiles, tiles / "runs", model={"gradient_checkpointing": checkpointing}
        )
        adapter = api.make_task(cfg).adapter()
        assert adapter.model.get_base_model().checkpointing is checkpointing
        adapter.train()
        adapter(source=torch.randn(2, 2, 16, 16))["prediction"].square().sum().backward()
        grads.append([p.grad.clone() for p in adapter.parameters() if p.requires_grad])
    assert all(torch.allclose(x, y, atol=1e-6) for x, y in zip(*grads, strict=True))


def test_an_fp16_base_trains_with_a_checkpointed_grad_scaler(tiles: Path) -> None:
    cfg = translate_config(tiles, tiles / "runs", model={"dtype": "fp16"}, precision="fp16",
                           data={"val": None})  # fmt: skip
    run = api.train(cfg).run_dir
    assert all(r["update_applied"] for r in records(run / "metrics.jsonl"))
    assert (run / "checkpoints" / "step-00000002" / "scaler.pt").is_file()


def test_checkpointing_a_module_without_a_hook_is_a_config_error(tiles: Path) -> None:
    model = {"builder": "user_code_for_tests:conv_translator", "builder_args": {},
             "gradient_checkpointing": True}  # fmt: skip
    cfg = translate_config(tiles, tiles / "runs", model=model, lora={"enabled": False})
    with pytest.raises(ConfigError, match="has no gradient_checkpointing_enable or set_grad"):
        api.make_task(cfg).adapter()
