"""The SLURM script of examples/slurm, run under real bash with `visiontune` and `scontrol` stubbed.

`#SBATCH --signal=B:USR1@120` signals only the batch shell, so these tests send the signal to the
shell's pid, as slurmd does, and look at what reached the (stub) training process and whether the
job was requeued. The Python side (signal -> checkpoint -> exit 75) is tested in test_stop.py and
test_stops_and_precision.py.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from visiontune.engine.stop import EXIT_RESUMABLE

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples/slurm/train.sbatch"
JOB_ID = "4242"

# Flag-setting handlers like the engine's: a signal is acted on after the current "step", and a
# second signal while "saving" must not change the outcome.
VISIONTUNE_STUB = """#!{python}
import os, signal, sys, time
from pathlib import Path

log = Path(os.environ["STUB_LOG"])
got = []
for sig in (signal.SIGUSR1, signal.SIGTERM):
    signal.signal(sig, lambda signum, frame: got.append(signal.Signals(signum).name[3:]))
(log / "argv.tmp").write_text(" ".join(sys.argv[1:]))
os.replace(log / "argv.tmp", log / "argv")  # the handlers are in place
deadline = time.monotonic() + float(os.environ["STUB_SECONDS"])
while not got and time.monotonic() < deadline:
    time.sleep(0.01)
if got:
    time.sleep(float(os.environ.get("STUB_SAVE_SECONDS", "0")))
    (log / "signals").write_text(" ".join(got))
    sys.exit({resumable})
sys.exit(int(os.environ["STUB_EXIT"]))
"""

SCONTROL_STUB = """#!/bin/sh
echo "$@" >> "$STUB_LOG/scontrol"
"""


def start_job(
    tmp_path: Path, seconds: float = 30, exit_code: int = 0, save_seconds: float = 0
) -> tuple[subprocess.Popen[bytes], Path]:
    """The batch script under bash, as slurmd starts it, with stubs first on PATH."""
    bin_dir, log = tmp_path / "bin", tmp_path / "log"
    bin_dir.mkdir()
    log.mkdir()
    stubs = {
        "visiontune": VISIONTUNE_STUB.format(python=sys.executable, resumable=EXIT_RESUMABLE),
        "scontrol": SCONTROL_STUB,
    }
    for name, text in stubs.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "SLURM_JOB_ID": JOB_ID,
        "STUB_LOG": str(log),
        "STUB_SECONDS": str(seconds),
        "STUB_EXIT": str(exit_code),
        "STUB_SAVE_SECONDS": str(save_seconds),
    }
    command = ["bash", str(SCRIPT), "cfg.yaml", "train.seed=3"]
    return subprocess.Popen(command, env=env, cwd=tmp_path), log


def wait_until_training(proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 30
    while not (log / "argv").is_file():
        assert proc.poll() is None, f"the batch script exited early with {proc.returncode}"
        assert time.monotonic() < deadline, "visiontune was never started"
        time.sleep(0.01)


def read(path: Path) -> str | None:
    return path.read_text().strip() if path.is_file() else None


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_a_signal_to_the_batch_shell_reaches_visiontune_and_requeues_on_75(
    tmp_path: Path, sig: signal.Signals
) -> None:
    proc, log = start_job(tmp_path)
    wait_until_training(proc, log)
    os.kill(proc.pid, sig)
    assert proc.wait(timeout=30) == EXIT_RESUMABLE
    assert read(log / "signals") == sig.name[3:]
    assert read(log / "scontrol") == f"requeue {JOB_ID}"
    assert read(log / "argv") == "train cfg.yaml --resume train.time_limit=7h55m train.seed=3"


def test_a_second_signal_while_visiontune_saves_still_gives_its_exit_code(tmp_path: Path) -> None:
    """USR1 at the warning, then the time limit's TERM while the checkpoint is being written."""
    proc, log = start_job(tmp_path, save_seconds=1.0)
    wait_until_training(proc, log)
    os.kill(proc.pid, signal.SIGUSR1)
    time.sleep(0.3)
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=30) == EXIT_RESUMABLE
    assert read(log / "signals") == "USR1 TERM"
    assert read(log / "scontrol") == f"requeue {JOB_ID}"


@pytest.mark.parametrize("code", [0, 1])
def test_other_exit_codes_pass_through_without_requeue(tmp_path: Path, code: int) -> None:
    proc, log = start_job(tmp_path, seconds=0, exit_code=code)
    assert proc.wait(timeout=30) == code
    assert read(log / "signals") is None
    assert read(log / "scontrol") is None


def test_the_script_asks_for_the_signal_the_tests_simulate() -> None:
    directives = re.findall(r"^#SBATCH (\S+)", SCRIPT.read_text(), re.MULTILINE)
    assert "--requeue" in directives
    assert any(re.fullmatch(r"--signal=B:USR1@\d+", d) for d in directives), directives


def test_the_readme_shows_the_script_as_it_is() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Checkpoints, resume and SLURM", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.DOTALL)
    assert SCRIPT.read_text() in blocks
