"""`visiontune train CFG --nproc N`: torchrun's own launcher, run from this process.

The launcher is torch's (`torch.distributed.run`), not ours: it starts N ranks of
`python -m visiontune train CFG ...` on this machine with a local rendezvous. It runs here
rather than replacing this process because torchrun reports any non-zero exit as a failure,
and a run stopped by a signal or its time limit exits 75, which must stay 75 (the SLURM
script requeues on it): under this launcher the ranks exit 0 and rank 0 leaves its exit code
in the file EXIT_FILE names, which the launcher returns. A rank that really fails is named,
with its exit code.
SIGUSR1 sent to this process (a SLURM `--signal`) is passed on to every rank, which agree to
save at the next optimizer step; SIGTERM the launcher passes on itself.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import tempfile
from pathlib import Path
from types import FrameType
from typing import Any

from visiontune.engine import distributed
from visiontune.errors import TrainingError

EXIT_FILE = "VISIONTUNE_EXIT_FILE"


def run_torchrun(nproc: int, argv: list[str]) -> int:
    """Run `python -m visiontune <argv>` on `nproc` local ranks; the exit code to return."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    args = get_args_parser().parse_args(
        ["--standalone", f"--nproc_per_node={nproc}", "--module", "visiontune", *argv]
    )
    previous = signal.signal(signal.SIGUSR1, _forward_to_ranks)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    with tempfile.TemporaryDirectory(prefix="visiontune-launch-") as tmp:
        exit_file = Path(tmp) / "exit-code"
        os.environ[EXIT_FILE] = str(exit_file)
        try:
            run(args)
        except ChildFailedError as failed:
            raise TrainingError(_failure_message(failed)) from None
        finally:
            signal.signal(signal.SIGUSR1, previous)
            del os.environ[EXIT_FILE]
        return int(exit_file.read_text()) if exit_file.is_file() else 0


def rank_exit_code(code: int) -> int:
    """The exit code of a rank: under `--nproc`, 0, with rank 0's code left for the launcher
    (torchrun would call 75 a failure and end the other ranks mid-write)."""
    exit_file = os.environ.get(EXIT_FILE)
    if not exit_file or not distributed.launched():
        return code
    if os.environ.get("RANK") == "0":
        Path(exit_file).write_text(str(code))
    return 0


def _failure_message(failed: Any) -> str:
    codes = {rank: failure.exitcode for rank, failure in failed.failures.items()}
    first_rank, first = failed.get_first_failure()
    return (
        f"rank {first_rank} failed first ({_describe(first.exitcode)}); every rank: "
        + ", ".join(f"rank {r} {_describe(c)}" for r, c in sorted(codes.items()))
        + "; each rank's error is above"
    )


def _describe(code: int) -> str:
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


def _forward_to_ranks(signum: int, frame: FrameType | None) -> None:
    for pid in _children(os.getpid()):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


def _children(pid: int) -> list[int]:
    """The ranks this launcher started (Linux: /proc/<pid>/task/*/children)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


def worker_argv(argv: list[str]) -> list[str]:
    """This command line for each rank: `--nproc N` removed (the ranks must not launch)."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out


def command_line() -> list[str]:
    """The arguments visiontune was started with (after the program name)."""
    return sys.argv[1:]
