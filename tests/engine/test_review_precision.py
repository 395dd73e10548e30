"""Regressions for the engine review of c1fb70d: predict precision, checkpoint contents of
tied-embedding models, and stop signals in every phase of `api.train`.

Each test fails on c1fb70d (see /work/shared/reviews/engine-review.md, the finding named in
its docstring) and states the behaviour the fix promises.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import TINY_VIT, tiny_config
from tests.ground.conftest import TINY_YAML as GROUND_YAML
from tests.ground.conftest import _make_tiny
from tests.segment.builders import segment_config
from tests.segment.test_seg_model import TINY_LLAMA, TOKENIZER
from visiontune import api
from visiontune.config.load import load_config
from visiontune.data.synthetic_reasonseg import generate
from visiontune.engine import checkpoint as ckpt
from visiontune.engine.state import WEIGHTS, checkpoint_tensors
from visiontune.engine.stop import EXIT_RESUMABLE
from visiontune.runs.rundir import read_jsonl
from visiontune.tasks.classify import ClassifyTask

# ---- finding 2: predict of a bf16-base classification run ------------------------------------


def test_predict_of_a_bf16_base_run_matches_the_runner_forward_and_eval(
    image_data: Path, tmp_path: Path
) -> None:
    """Finding 2: predict ran without autocast, so the fp32 head met bf16 activations."""
    cfg = tiny_config(
        image_data, tmp_path, train={"max_steps": 2}, precision="auto",
        model={"config": TINY_VIT, "dtype": "bf16"},
    )  # fmt: skip
    result = api.train(cfg)
    assert result.exit_code == 0 and result.state.step == 2

    loaded = api.load_run(result.run_dir)
    assert loaded.runner.precision.name == "bf16"  # auto on a CPU follows the bf16 base
    task = loaded.task
    val = task.datasets().val
    assert val is not None
    paths = [str(p) for p in val.image_paths()]
    records = api.predict(result.run_dir, [{"image": p} for p in paths], tmp_path / "pred")
    assert [r["image"] for r in records] == paths
    assert not any("error" in r for r in records)

    # The same preprocessed images through the task's collate and Runner.forward.
    batch = task.collate([val[i] for i in range(len(val))]).to(loaded.runner.device)
    loaded.runner.model.eval()
    with torch.no_grad():
        logits = loaded.runner.forward(batch)["logits"].float().cpu()
    expected = torch.exp(logits - logits.logsumexp(dim=-1, keepdim=True))  # softmax by hand
    classes = list(records[0]["probabilities"])
    got = torch.tensor([[r["probabilities"][c] for c in classes] for r in records])
    # bf16 autocast: logits carry ~3 significant digits; predict batches differently-sized
    # chunks than one batch of the whole split, so compare to a bf16 tolerance.
    torch.testing.assert_close(got, expected, rtol=0.0, atol=2e-2)
    assert got.sum(dim=-1).sub(1).abs().max() < 1e-5
    for record, row in zip(records, got, strict=True):
        assert record["label"] == classes[int(row.argmax())]
        assert record["score"] == pytest.approx(float(row.max()), abs=1e-6)

    # Eval's confusion matrix (rows: true class, columns: predicted) from predict's labels.
    metrics, _ = api.evaluate(result.run_dir)
    names = metrics.tables["classes"]
    matrix = [[0] * len(names) for _ in names]
    for path, record in zip(val.image_paths(), records, strict=True):
        matrix[names.index(Path(path).parent.name)][names.index(record["label"])] += 1
    assert metrics.tables["confusion_matrix"] == matrix


# ---- finding 4: a tied-embedding model's checkpoint holds only what trains -------------------


def _nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _old_rule(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What c1fb70d saved: every state_dict entry that is not a named parameter, plus the
    trainable ones (a tied head is deduplicated out of named_parameters)."""
    params = dict(model.named_parameters())
    return {
        n: t.detach().contiguous()
        for n, t in model.state_dict().items()
        if n not in params or params[n].requires_grad
    }


def _latest_weights(run_dir: Path) -> Path:
    latest = ckpt.latest_complete(run_dir / "checkpoints")
    assert latest is not None
    return latest / WEIGHTS


def _compare_sizes(model: torch.nn.Module, weights: Path) -> tuple[int, int]:
    """Tensor bytes the old rule would have saved for this model, and those saved now."""
    before, after = _nbytes(_old_rule(model)), _nbytes(load_file(str(weights)))
    print(
        f"checkpoint size: before (old rule) {before} bytes, after {after} bytes "
        f"({weights.stat().st_size} bytes on disk)"
    )
    return before, after


@pytest.fixture(scope="module")
def ground_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _make_tiny().write_tiny_example(tmp_path_factory.mktemp("gui_click"))


def test_tied_qwen2_vl_checkpoint_holds_only_lora(ground_data: Path, tmp_path: Path) -> None:
    """Finding 4: a tied lm_head (the vocabulary matrix) was written into every checkpoint."""
    cfg = load_config(
        GROUND_YAML,
        [
            f"data.train={ground_data / 'train.jsonl'}",
            f"data.val={ground_data / 'val.jsonl'}",
            f"task.processor={ground_data / 'processor'}",
            f"output_dir={tmp_path / 'runs'}",
            "model.config.text_config.tie_word_embeddings=true",
            "train.max_steps=1",
            "eval.every_steps=null",
            "acceptance={}",
        ],
    )
    result = api.train(cfg)
    assert result.exit_code == 0 and result.state.step == 1
    weights = _latest_weights(result.run_dir)
    keys = set(load_file(str(weights)))
    assert keys and all("lora_" in k or "modules_to_save" in k for k in keys), sorted(
        k for k in keys if "lora_" not in k
    )
    assert not any(k.endswith(("lm_head.weight", "embed_tokens.weight")) for k in keys)

    model = api.load_run(result.run_dir).runner.adapter
    hf = model.model.get_base_model()
    assert hf.lm_head.weight is hf.get_input_embeddings().weight  # the model is really tied
    old = _old_rule(model)
    assert any(k.endswith("lm_head.weight") for k in old)  # what the old rule saved
    before, after = _compare_sizes(model, weights)
    assert after < before


def test_tied_llama_text_segmenter_checkpoint_holds_only_what_trains(tmp_path: Path) -> None:
    """Finding 4 (LISA layout): tied Llama with a trainable [SEG] row, LoRA, seg projector."""
    data = generate(tmp_path / "data", {"train": 4}, size=64, seed=0)
    text_model = {"config": {**TINY_LLAMA, "tie_word_embeddings": True}, "tokenizer": TOKENIZER}
    cfg = segment_config(
        {"format": "reasonseg", "train": str(data / "train")},
        {"prompt": "text", "text_model": text_model},
        output_dir=str(tmp_path / "runs"),
        train={"max_steps": 1, "micro_batch_size": 4},
    )
    result = api.train(cfg)
    assert result.exit_code == 0 and result.state.step == 1
    weights = _latest_weights(result.run_dir)
    saved = load_file(str(weights))

    model = api.load_run(result.run_dir).runner.adapter
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(saved) == trainable == set(checkpoint_tensors(model))
    allowed = ("lora_", "modules_to_save", "trainable_tokens")
    others = sorted(k for k in saved if not any(a in k for a in allowed))
    assert others and all(k.startswith("seg_projector.") for k in others), others
    assert not any(k.endswith(("lm_head.weight", "embed_tokens.weight")) for k in saved)
    assert not any("base_layer" in k for k in saved)
    # [SEG]'s row is one parameter shared by the tied embedding and head: saved once.
    tokens = [k for k in saved if "trainable_tokens" in k]
    assert len(tokens) == 1 and saved[tokens[0]].shape == (1, TINY_LLAMA["hidden_size"])

    old = _old_rule(model)
    assert any("lm_head" in k and "base_layer" in k for k in old)  # what the old rule saved
    before, after = _compare_sizes(model, weights)
    assert after < before


# ---- findings 8 and the set-up / last-step signals -------------------------------------------


@pytest.fixture
def usr1_fallback() -> Iterator[list[int]]:
    """A handler for SIGUSR1 under the engine's: were the engine not to catch the signal, the
    default action would kill pytest; with this the test fails on its assertions instead."""
    seen: list[int] = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: seen.append(signum))
    yield seen
    signal.signal(signal.SIGUSR1, previous)


def _signal_on_training_step(monkeypatch: pytest.MonkeyPatch, step: int) -> None:
    """SIGUSR1 during the forward of training step `step` (one micro-batch per step): the
    task's loss sends it on its `step`-th call with gradients (evaluation's calls have none),
    then computes the real loss."""
    real = ClassifyTask.loss
    calls = {"train": 0}

    def loss(self: ClassifyTask, outputs: Any, batch: Any) -> Any:
        if outputs["logits"].requires_grad:
            calls["train"] += 1
            if calls["train"] == step:
                os.kill(os.getpid(), signal.SIGUSR1)
        return real(self, outputs, batch)

    monkeypatch.setattr(ClassifyTask, "loss", loss)


def _eval_steps(run_dir: Path) -> list[int]:
    path = run_dir / "eval.jsonl"
    return [r["step"] for r in read_jsonl(path)] if path.is_file() else []


def _checkpoint_steps(run_dir: Path) -> list[int]:
    root = run_dir / "checkpoints"
    return sorted(
        int(p.name.removeprefix(ckpt.STEP_PREFIX))
        for p in (root.iterdir() if root.is_dir() else [])
        if ckpt.is_complete(p)
    )


def test_a_stop_signal_is_honoured_before_a_due_evaluation(
    image_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, usr1_fallback: list[int]
) -> None:
    """Finding 8: the eval due at the signalled step ran first, before saving and exiting."""
    cfg = tiny_config(image_data, tmp_path, train={"max_steps": 4}, eval={"every_steps": 1})
    _signal_on_training_step(monkeypatch, 2)
    result = api.train(cfg)
    assert usr1_fallback == []  # the engine caught it
    assert result.exit_code == EXIT_RESUMABLE
    assert result.state.step == 2 and result.summary["status"] == "signal:SIGUSR1"
    assert _eval_steps(result.run_dir) == [1]
    assert _checkpoint_steps(result.run_dir) == [2]


def test_a_signal_during_setup_ends_the_run_before_training(
    image_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, usr1_fallback: list[int]
) -> None:
    cfg = tiny_config(image_data, tmp_path, train={"max_steps": 3})
    real = ClassifyTask.datasets
    sent = []

    def datasets(self: ClassifyTask) -> Any:
        if not sent:
            sent.append(True)
            os.kill(os.getpid(), signal.SIGUSR1)
        return real(self)

    monkeypatch.setattr(ClassifyTask, "datasets", datasets)
    result = api.train(cfg)
    assert sent and usr1_fallback == []
    assert result.exit_code == EXIT_RESUMABLE
    assert result.state.step == 0
    assert _checkpoint_steps(result.run_dir) == []
    assert not (result.run_dir / "metrics.jsonl").is_file() or not read_jsonl(
        result.run_dir / "metrics.jsonl"
    )


def test_a_signal_in_the_last_step_saves_and_resume_runs_the_final_evaluation(
    image_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, usr1_fallback: list[int]
) -> None:
    """The eval due at the last step is left to the resumed job, which completes the run."""
    cfg = tiny_config(image_data, tmp_path, train={"max_steps": 3}, eval={"every_steps": 3})
    _signal_on_training_step(monkeypatch, 3)
    first = api.train(cfg)
    assert usr1_fallback == []
    assert first.exit_code == EXIT_RESUMABLE and first.state.step == 3
    assert _checkpoint_steps(first.run_dir) == [3]
    assert _eval_steps(first.run_dir) == []
    assert not (first.run_dir / "best").exists()

    monkeypatch.undo()
    again = api.train(cfg, resume=True)
    assert again.exit_code == 0 and again.state.step == 3
    assert again.summary["status"] == "completed"
    assert _eval_steps(again.run_dir) == [3]
    assert again.state.best_step == 3 and (again.run_dir / "best" / WEIGHTS).is_file()
