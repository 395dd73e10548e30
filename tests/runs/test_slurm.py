"""`visiontune slurm`: the script it writes, the checks before submission, and the whole chain
signal -> save -> exit 75 -> requeue -> resume on a real training process under real torchrun,
with `sbatch`, `srun` and `scontrol` stubbed by scripts on PATH that record their calls.

The stubs stand in for SLURM as documented: sbatch runs the batch script with SLURM_JOB_ID
set and runs it again while `scontrol requeue` was called during it; srun starts its command
as a job step in a process group of its own, and the test signals that whole group, as
`--signal=USR1@N` (no `B:`) signals every process of the step.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from tests.conftest import tiny_config
from visiontune import api
from visiontune.cli import app
from visiontune.engine import checkpoint as ckpt
from visiontune.engine.plan.forecast import TrainForecast
from visiontune.engine.state import WEIGHTS
from visiontune.engine.stop import StopRequest
from visiontune.runs import slurm
from visiontune.runs.rundir import LOGGER, read_jsonl

JOB_ID = "4242"  # as the sbatch stub sets it

SBATCH = """#!/bin/bash
echo "sbatch $*" >> "$STUB_LOG/calls"
script="${@: -1}"
(
  export SLURM_JOB_ID=4242 SLURM_JOB_NODELIST=node1 SLURM_NNODES=1
  while :; do
    rm -f "$STUB_LOG/requeued"
    bash "$script" >> "$STUB_LOG/job.out" 2>&1
    echo $? >> "$STUB_LOG/exits"
    [ -f "$STUB_LOG/requeued" ] || break
  done
  touch "$STUB_LOG/done"
) > /dev/null 2>&1 &
echo "Submitted batch job 4242"
"""

SRUN = """#!/bin/bash
echo "srun $*" >> "$STUB_LOG/calls"
while [[ "$1" == -* ]]; do shift; done
setsid "$@" &
echo $! > "$STUB_LOG/step.pid"
wait $!
"""

SCONTROL = """#!/bin/bash
echo "scontrol $*" >> "$STUB_LOG/calls"
case "$1 $2" in
  "show hostnames") echo localhost ;;
  requeue*) touch "$STUB_LOG/requeued" ;;
esac
"""


def stub_env(tmp_path: Path) -> tuple[dict[str, str], Path]:
    bin_dir, log = tmp_path / "bin", tmp_path / "log"
    bin_dir.mkdir()
    log.mkdir()
    for name, text in {"sbatch": SBATCH, "srun": SRUN, "scontrol": SCONTROL}.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        port = sock.getsockname()[1]
    env = {
        **os.environ,
        "PATH": os.pathsep.join(
            [str(bin_dir), str(Path(sys.executable).parent), os.environ["PATH"]]
        ),
        "PYTHONPATH": os.pathsep.join(sys.path),
        "STUB_LOG": str(log),
        "MASTER_PORT": str(port),
        "OMP_NUM_THREADS": "1",
    }
    for key in ("SLURM_JOB_ID", "RANK", slurm.REQUEUE_ENV):
        env.pop(key, None)
    return env, log


def wait_for(condition: object, what: str, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def test_usr1_to_the_job_step_saves_exits_75_requeues_and_the_resumed_run_matches(
    image_data: Path, tmp_path: Path
) -> None:
    steps = 120  # ~15 ms each: the signal, sent after step 2, lands well before the end
    cfg = tiny_config(
        image_data, tmp_path / "runs",
        train={"max_steps": steps, "log_every": 10},
        checkpoint={"every_steps": 1000, "keep_last": 1},
    )  # fmt: skip
    cfg.data.val = None  # no evaluation: the test is about the stop, not the metrics
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    env, log = stub_env(tmp_path)
    # The step time is given (the plan's probe that measures it is tested in tests/engine).
    submitted = subprocess.run(
        [sys.executable, "-m", "visiontune.cli", "slurm", str(config), "--time", "0:10:00",
         "--gpus-per-node", "1", "--signal-margin", "120", "--step-time", "0.5",
         "--save-time", "1", "--submit"],
        env=env, cwd=tmp_path, capture_output=True, text=True,
    )  # fmt: skip
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    assert f"Submitted batch job {JOB_ID}" in submitted.stdout
    script = tmp_path / "runs/tiny.sbatch"
    metrics = tmp_path / "runs/tiny/metrics.jsonl"
    wait_for(lambda: metrics.is_file() and len(read_jsonl(metrics)) >= 2, "training steps")
    os.killpg(int((log / "step.pid").read_text()), signal.SIGUSR1)
    wait_for(lambda: (log / "done").exists(), "the job chain to end")

    calls = (log / "calls").read_text().splitlines()
    assert calls[0] == f"sbatch {script}"
    assert calls.count(f"scontrol requeue {JOB_ID}") == 1
    assert sum(c.startswith("srun ") for c in calls) == 2  # the first job and the requeued one
    train_log = (tmp_path / "runs/tiny/train.log").read_text()
    stopped = re.search(r"stopping at step (\d+): signal:SIGUSR1", train_log)
    assert stopped is not None and 0 < int(stopped.group(1)) < steps, train_log[-2000:]
    assert f"resumed from {tmp_path / 'runs/tiny/checkpoints'}" in train_log
    assert json.loads((tmp_path / "runs/tiny/summary.json").read_text())["status"] == "completed"

    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the job's OMP_NUM_THREADS=1
    try:
        reference = api.train(cfg.model_copy(update={"name": "reference"}), allow_duplicate=True)
    finally:
        torch.set_num_threads(torch_threads)
    assert reference.exit_code == 0
    final = {}
    for name in ("tiny", "reference"):
        latest = ckpt.latest_complete(tmp_path / f"runs/{name}/checkpoints")
        assert latest is not None and latest.name == f"step-{steps:08d}"
        final[name] = load_file(str(latest / WEIGHTS))
    assert final["tiny"].keys() == final["reference"].keys()
    for key, tensor in final["reference"].items():
        assert torch.equal(final["tiny"][key], tensor), key


def test_a_time_limit_shorter_than_one_step_and_save_is_refused_before_sbatch(
    image_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "cfg.yaml"
    cfg = tiny_config(image_data, tmp_path / "runs")
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    env, log = stub_env(tmp_path)
    monkeypatch.setenv("PATH", env["PATH"])
    monkeypatch.setenv("STUB_LOG", env["STUB_LOG"])
    result = CliRunner().invoke(
        app,
        ["slurm", str(config), "--time", "2", "--step-time", "100", "--save-time", "30",
         "--signal-margin", "60", "--submit"],
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "--time 00:02:00 is shorter than start-up 0.0s + one step 1m40s + one save" in (
        result.output
    )
    assert "--signal-margin 60s is shorter than one step plus one save (2m10s" in result.output
    assert not (log / "calls").exists()
    assert not (tmp_path / "runs/tiny.sbatch").exists()


def test_forecast_counts_requeues_and_warns_when_a_job_cannot_reach_a_checkpoint(
    image_data: Path, tmp_path: Path
) -> None:
    cfg = tiny_config(
        image_data, tmp_path, train={"max_steps": 2000}, checkpoint={"every_steps": 500}
    )
    job = slurm.SlurmJob(tmp_path / "cfg.yaml", [], 3600.0, gpus_per_node=4, margin_s=300)
    lines = slurm.check_job(job, cfg, slurm.given_timing(cfg, 10.0, 5.0, 2000))
    # By hand: 2000 steps x 10s + 4 saves x 5s = 20020s. A job keeps 2 steps + a save (25s)
    # back, so 3575s train per job: ceil(20020 / 3575) = 6 jobs. One checkpoint interval is
    # 500 x 10 + 5 = 5005s > 3600 - 300 = 3300s; int((3300 - 5) / 10) = 329 steps fit.
    assert "predicted run: 2000 steps, about 5h33m in all; 6 job(s) of 01:00:00, 5 requeue(s)" in (
        lines
    )
    assert "set checkpoint.every_steps=329 or less" in lines[-1]


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("8:00:00", 28800), ("90", 5400), ("10:30", 630), ("1-12", 129600),
     ("2-0:30:00", 174600), ("1-2:03", 93780), ("7h50m", 28200)],
)  # fmt: skip
def test_slurm_time_formats(text: str, seconds: float) -> None:
    assert slurm.parse_slurm_time(text) == seconds


def test_a_bad_time_names_the_forms() -> None:
    with pytest.raises(ValueError, match="8:00:00, 1-12:00:00 or 480"):
        slurm.parse_slurm_time("8 hours")


def test_the_script_signals_the_steps_and_passes_bash(image_data: Path, tmp_path: Path) -> None:
    cfg = tiny_config(image_data, tmp_path)
    job = slurm.SlurmJob(
        tmp_path / "cfg.yaml", ["optim.lr=5e-5"], 8 * 3600.0, gpus_per_node=4, nodes=2,
        account="proj1", partition="gpu", margin_s=300,
    )  # fmt: skip
    text = slurm.render(job, cfg, tmp_path / "out-%j.log")
    directives = re.findall(r"^#SBATCH (\S+)", text, re.MULTILINE)
    expected = ["--time=08:00:00", "--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=4",
                "--signal=USR1@300", "--requeue", "--account=proj1", "--partition=gpu"]  # fmt: skip
    assert set(expected) <= set(directives)
    assert "train.time_limit=7h55m0s optim.lr=5e-5" in text
    assert "--nproc-per-node=4" in text and "--rdzv-backend=c10d" in text
    assert subprocess.run(["bash", "-n"], input=text, text=True).returncode == 0


@pytest.mark.parametrize(("rank", "calls"), [("0", ["requeue 77"]), ("1", [])])
def test_only_rank_0_requeues(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rank: str, calls: list[str]
) -> None:
    (tmp_path / "scontrol").write_text(f'#!/bin/sh\necho "$*" >> {tmp_path}/calls\n')
    (tmp_path / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv(slurm.REQUEUE_ENV, "1")
    slurm.requeue_if_asked(0)
    slurm.requeue_if_asked(75)
    recorded = tmp_path / "calls"
    assert (recorded.read_text().splitlines() if recorded.exists() else []) == calls


def test_the_training_forecast_counts_the_requeues_left(
    image_data: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = tiny_config(image_data, tmp_path, train={"max_steps": 1000, "time_limit": "100s"})
    stop = StopRequest(100, started=time.monotonic())
    forecast = TrainForecast(cfg, 1000, stop)
    logger = logging.getLogger(LOGGER)
    logger.addHandler(caplog.handler)
    try:
        for step in range(1, 5):  # 4 steps "of 2s" observed at once: start-up counts as 0
            forecast.observe(step, 2.0, has_eval=False)
    finally:
        logger.removeHandler(caplog.handler)
    # By hand: this job reaches step 4 + int(~100 / 2) = 54. A job of 100s trains
    # (100 - 0 - 2 * 2) / 2 = 48 steps; (1000 - 54) / 48 = 19.7 -> 20 more jobs.
    assert "about 20 more job(s) of 48 steps finish it (20 requeue(s))" in caplog.text


def test_a_different_earlier_script_is_kept_aside_and_an_identical_one_left_alone(
    tmp_path: Path,
) -> None:
    script = tmp_path / "run.sbatch"
    assert slurm.write_script(script, "#!/bin/bash\necho one\n") is None
    assert slurm.write_script(script, "#!/bin/bash\necho one\n") is None
    aside = slurm.write_script(script, "#!/bin/bash\necho two\n")
    assert aside is not None and aside.read_text() == "#!/bin/bash\necho one\n"
    assert script.read_text() == "#!/bin/bash\necho two\n"
    again = slurm.write_script(script, "#!/bin/bash\necho three\n")  # within the same second
    assert again is not None and again.read_text() == "#!/bin/bash\necho two\n"
    assert aside.read_text() == "#!/bin/bash\necho one\n"
    assert len(list(tmp_path.iterdir())) == 3
