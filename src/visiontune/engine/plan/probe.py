"""One measurement: a fresh process builds the model and runs K real optimizer steps.

A fresh process per measurement, because a peak is a high-water mark: the resident set of a
process that already ran a bigger micro-batch never goes down again, and the CUDA caching
allocator keeps what it once held. The child trains through the real Runner and Loop in a
temporary run directory, deleted afterwards, so nothing of the user's run is touched.

Memory parts: frozen weights, trainable weights, their gradients and the AdamW state (two
states per trainable parameter) are computed exactly from the parameters; what the process
held before the model was built (interpreter, libraries, the data) is measured; activations
and workspace are the measured peak minus all of these.

Step time is only worth predicting if the child trains the way the run will: with the training
process's intra-op thread count (a child would otherwise start with torch's default, and a
caller that lowered it, or a worker process that shares the cores, would be measured with a
different number) and the same DataLoader settings. Both are recorded (`run_settings`) on
each side, so summary.json can show they matched. The statistic is the run's own
(`steady_step_s`): the median after the first step, the one that pays warm-up and the data
workers' start-up. A median of the probe's later half alone missed the cost of loading that
overlaps each step: with a probe as long as an epoch, its later half is the epoch's end, where
the workers have nothing left to load and the steps run alone, faster than the run's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from visiontune.config.load import apply_override, describe_errors, dump_yaml
from visiontune.config.schema import Config
from visiontune.errors import ConfigError

MB = 2**20


@dataclass
class Probe:
    """What one measurement found; `error` is set (and the figures zero) when it failed."""

    overrides: list[str]
    micro_batch_size: int
    device: str = "cpu"
    steps: int = 0
    step_times_s: list[float] = field(default_factory=list)
    step_s: float = 0.0
    settings: dict[str, Any] = field(default_factory=dict)
    samples_per_s: float = 0.0
    peak_mb: float = 0.0
    runtime_mb: float = 0.0
    frozen_mb: float = 0.0
    trainable_mb: float = 0.0
    gradients_mb: float = 0.0
    optimizer_mb: float = 0.0
    activations_mb: float = 0.0
    eval_s: float | None = None
    save_s: float = 0.0
    startup_s: float = 0.0
    total_steps: int = 0
    budget_mb: float | None = None
    cap_enforced: bool = False
    error: str | None = None
    out_of_memory: bool = False

    @property
    def fits(self) -> bool:
        """Ran, and (with a budget) stayed under it."""
        if self.error is not None:
            return False
        return self.budget_mb is None or self.peak_mb <= self.budget_mb


def with_overrides(cfg: Config, items: list[str]) -> Config:
    """`cfg` with dotted overrides applied, validated like a config file's."""
    raw = cfg.model_dump(mode="json")
    problems = [p for item in items if (p := apply_override(raw, item))]
    try:
        changed = Config.model_validate(raw)
    except ValidationError as err:
        problems.extend(describe_errors(err))
        raise ConfigError(problems, source="plan overrides") from None
    if problems:
        raise ConfigError(problems, source="plan overrides")
    return changed


def measure(
    cfg: Config, steps: int, overrides: list[str] | None = None, budget_mb: float | None = None
) -> Probe:
    """Run `steps` optimizer steps of `cfg` (with `overrides`) in a fresh process."""
    overrides = list(overrides or [])
    variant = with_overrides(cfg, overrides)
    with tempfile.TemporaryDirectory(prefix="visiontune-plan-") as tmp:
        probe_cfg = with_overrides(
            variant,
            [
                f"output_dir={tmp}",
                "name=probe",
                "train.time_limit=null",
                "train.plan=false",
                "checkpoint.remote_dir=null",  # a measurement is never copied to the user's bucket
                "tracking.tensorboard=false",
            ],
        )
        request = Path(tmp) / "request.json"
        result = Path(tmp) / "result.json"
        (Path(tmp) / "config.yaml").write_text(dump_yaml(probe_cfg))
        request.write_text(
            json.dumps({"steps": steps, "budget_mb": budget_mb, "threads": torch_threads()})
        )
        done = subprocess.run(
            [sys.executable, "-m", "visiontune.engine.plan.probe", tmp],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONWARNINGS": "ignore"},
        )
        if result.is_file():
            found = json.loads(result.read_text())
        else:
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            found = {"error": f"the measuring process died (exit {done.returncode}): {tail}"}
    micro = variant.train.micro_batch_size
    return Probe(overrides=overrides, micro_batch_size=micro, budget_mb=budget_mb, **found)


def torch_threads() -> int:
    """This process's intra-op thread count (imports torch only when asked)."""
    import torch

    return torch.get_num_threads()


def run_settings(cfg: Config) -> dict[str, Any]:
    """What decides a CPU step's speed besides the config's model: the intra-op threads and
    the DataLoader the training split gets (workers resolved from `auto`)."""

    from visiontune.engine.loader import loader_options
    from visiontune.engine.precision import resolve_device

    device = resolve_device(cfg.train.device)
    return {"torch_threads": torch_threads(), **loader_options(cfg.data, device, persistent=True)}


def steady_step_s(times: list[float]) -> float | None:
    """The median step time after the first step; the same statistic for the probe and for
    the run it predicts."""
    later = sorted(times[1:]) or sorted(times)
    return later[len(later) // 2] if later else None


def parameter_parts(model: Any) -> dict[str, float]:
    """Frozen and trainable bytes from the parameters; gradients have their parameter's dtype
    and AdamW keeps two states (exp_avg, exp_avg_sq) shaped and typed like each trainable."""
    frozen = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return {
        "frozen_mb": frozen / MB,
        "trainable_mb": trainable / MB,
        "gradients_mb": trainable / MB,
        "optimizer_mb": 2 * trainable / MB,
    }


def run_child(tmp: Path) -> dict[str, Any]:
    """The measuring process: real task, adapter, Runner and Loop; K steps, one evaluation and
    one checkpoint save, each timed."""
    import torch

    from visiontune import api
    from visiontune.config.load import load_config
    from visiontune.engine.loop import Loop
    from visiontune.engine.precision import resolve_device
    from visiontune.engine.runner import Runner, current_memory_mb, peak_memory_mb
    from visiontune.engine.stop import StopRequest, process_started
    from visiontune.runs.rundir import RunDir

    request = json.loads((tmp / "request.json").read_text())
    torch.set_num_threads(request["threads"])
    cfg = load_config(tmp / "config.yaml")
    run = RunDir(cfg.run_dir)
    run.root.mkdir(parents=True)
    api.seed_everything(cfg.train.seed)
    task = api.make_task(cfg)
    splits = task.datasets()
    device = resolve_device(cfg.train.device)
    cap_enforced = False
    if device.type == "cuda" and request["budget_mb"]:
        total = torch.cuda.get_device_properties(device).total_memory / MB
        torch.cuda.set_per_process_memory_fraction(min(1.0, request["budget_mb"] / total), device)
        cap_enforced = True
    runtime = current_memory_mb(device)
    adapter = api.build_adapter(task, cfg, run)
    loop = Loop(cfg, task, Runner(cfg, adapter), splits, run, StopRequest(None))
    loop.runner.train_mode()
    startup_s = time.monotonic() - process_started()
    times = []
    for _ in range(request["steps"]):
        times.append(loop.optimizer_step()["step_time_s"])
    eval_s = None
    if loop.eval_dataset() is not None:
        started = time.monotonic()
        loop.evaluate()
        eval_s = time.monotonic() - started
    started = time.monotonic()
    loop.save_checkpoint()
    save_s = time.monotonic() - started
    parts = parameter_parts(loop.runner.adapter)
    peak = peak_memory_mb(device)
    step_s = steady_step_s(times) or 0.0
    samples = cfg.train.micro_batch_size * cfg.train.grad_accum_steps
    return {
        "device": str(device),
        "steps": len(times),
        "step_times_s": times,
        "step_s": step_s,
        "settings": run_settings(cfg),
        "samples_per_s": samples / step_s,
        "peak_mb": peak,
        "runtime_mb": runtime,
        **parts,
        "activations_mb": max(0.0, peak - runtime - sum(parts.values())),
        "eval_s": eval_s,
        "save_s": save_s,
        "startup_s": startup_s,
        "total_steps": loop.total_steps,
        "cap_enforced": cap_enforced,
    }


def main() -> None:
    """`python -m visiontune.engine.plan.probe DIR`: measure, write DIR/result.json."""
    tmp = Path(sys.argv[1])
    try:
        found = run_child(tmp)
    except Exception as err:  # reported to the parent as data: a failed variant is an answer
        text = f"{type(err).__name__}: {err}"
        oom = "out of memory" in text.lower() or type(err).__name__ == "OutOfMemoryError"
        found = {"error": text.splitlines()[0][:300], "out_of_memory": oom}
    (tmp / "result.json").write_text(json.dumps(found))


if __name__ == "__main__":
    main()
