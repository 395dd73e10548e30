from pathlib import Path

import pytest

from visiontune.config import load_config
from visiontune.config.schema import parse_criterion, parse_duration
from visiontune.errors import ConfigError

BASE = """
model: {config: {model_type: vit}}
data: {train: DATA}
train: {max_steps: 10}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text.replace("DATA", str(tmp_path)))
    return path


def test_overrides_are_parsed_as_yaml_and_applied(tmp_path: Path) -> None:
    cfg = load_config(
        write(tmp_path, BASE), ["optim.lr=5e-5", "lora.rank=16", "data.val_fraction=0.2"]
    )
    assert cfg.optim.lr == pytest.approx(5e-5)
    assert cfg.lora.rank == 16
    assert cfg.data.val_fraction == pytest.approx(0.2)


def test_all_problems_reported_at_once_with_paths_and_suggestions(tmp_path: Path) -> None:
    text = BASE.replace("max_steps: 10", "max_steps: 10, micro_batchsize: 4") + "optim: {lr: -1}\n"
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), ["lora.rnak=3", "train.time_limit=7x"])
    problems = info.value.problems
    assert "lora.rnak: unknown key; did you mean `lora.rank`?" in problems
    assert "train.micro_batchsize: unknown key; did you mean `train.micro_batch_size`?" in problems
    assert any(p.startswith("optim.lr: Input should be greater than 0") for p in problems)
    assert any(p.startswith("train.time_limit: not a duration") for p in problems)
    assert len(problems) == 4


def test_wrong_type_names_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, BASE), ["train.micro_batch_size=many"])
    assert info.value.problems[0].startswith("train.micro_batch_size:")


def test_missing_budget_and_bad_override_syntax(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, BASE.replace("max_steps: 10", "seed: 1")), ["nonsense"])
    text = str(info.value)
    assert "not of the form key.sub=value" in text
    assert "set train.max_steps or train.epochs" in text


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "model: [unclosed"))


def test_durations_and_criteria() -> None:
    assert parse_duration("7h50m") == 7 * 3600 + 50 * 60
    assert parse_duration("1d2h") == 26 * 3600
    assert parse_duration("45s") == 45
    with pytest.raises(ValueError):
        parse_duration("soon")
    assert parse_criterion(">=0.90") == (">=", 0.9)
    assert parse_criterion("< 1e-3") == ("<", 0.001)
    with pytest.raises(ValueError):
        parse_criterion("about 0.9")


def test_suggestions_inside_task_union_and_dict_sections(tmp_path: Path) -> None:
    segment = BASE + "task: {type: segment, promt: box}\n"
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, segment), ["data.augment.train.hflp=0.5"])
    problems = info.value.problems
    assert "task.promt: unknown key; did you mean `task.prompt`?" in problems
    assert "data.augment.train.hflp: unknown key; did you mean `data.augment.train.hflip`?" in (
        problems
    )
