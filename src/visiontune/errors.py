"""User-facing errors.

Anything a user can fix (a config key, a file, a sample) raises one of these with a message
that names the culprit; the CLI prints the message alone, without a traceback.
"""


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


class TrainingError(VisiontuneError):
    """Training cannot continue (NaN loss, too many corrupt samples, precision mismatch)."""
