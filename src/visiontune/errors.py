"""User-facing errors.

Anything a user can fix (a config key, a file, a sample) raises one of these with a message
that names the culprit; the CLI prints the message alone, without a traceback, and exits 2 for
config and data problems alike (a script needs one code for "fix your inputs").

Data problems share one shape whatever the format: `<path>: <problem>`, or
`<path>:<line>: <problem>` when the file has lines (CSV, JSONL), so an editor or a terminal
jumps straight to the culprit.
"""

from __future__ import annotations

from pathlib import Path

MAX_LISTED = 20  # problems one DataError lists; the rest are counted


def located(path: Path | str, problem: str, line: int | None = None) -> str:
    """`<path>[:<line>]: <problem>`: the one way a data problem is written."""
    where = f"{path}:{line}" if line is not None else str(path)
    return f"{where}: {problem}"


class VisiontuneError(Exception):
    """An error whose message is complete and actionable on its own."""


class ConfigError(VisiontuneError):
    """The config (file, overrides or the data it points at) is invalid.

    Holds every problem found, so a user fixes them all in one round instead of one per run.
    """

    def __init__(self, problems: list[str], source: str = "config") -> None:
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source} has {len(problems)} problem(s):\n{lines}")


class DataError(VisiontuneError):
    """A data file or sample is unusable (missing, corrupt, unknown label, empty split)."""

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = problems if problems is not None else [message]

    @staticmethod
    def listing(problems: list[str], source: str, noun: str = "problem(s)") -> DataError:
        """One error for many problems (the first MAX_LISTED shown), fixed in one round."""
        shown = "\n".join(f"  - {p}" for p in problems[:MAX_LISTED])
        more = len(problems) - MAX_LISTED
        tail = f"\n  ... and {more} more" if more > 0 else ""
        return DataError(f"{source} has {len(problems)} {noun}:\n{shown}{tail}", problems)


class ImageError(DataError):
    """An image file that is missing or cannot be decoded; keeps the path and the reason apart
    so a caller can name the file first (a listing of bad files) or the sample first."""

    def __init__(self, path: Path, problem: str) -> None:
        self.path = path
        self.problem = problem
        super().__init__(located(path, problem))


class TrainingError(VisiontuneError):
    """Training cannot continue (NaN loss, too many corrupt samples, precision mismatch)."""
