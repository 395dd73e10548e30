"""Decode every image the configured splits list: what `visiontune config check` promises.

Loaders check that files exist up front but leave decoding to training time, where a corrupt
file is a counted skip, because decoding a large dataset takes minutes. `config check` is the
place to spend those minutes: it decodes every image (in threads; PIL's decoders release the
GIL), shows its progress, and reports every unreadable file at once.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from visiontune.data.images import open_image
from visiontune.errors import ImageError
from visiontune.runs.progress import TerminalBar

PROGRESS_FROM = 100  # images; fewer are checked too quickly for a progress display to help
LINES = 10  # progress lines printed over a whole check when stdout is not a terminal


@runtime_checkable
class ListsImages(Protocol):
    """A dataset that can say which image files it will read."""

    def image_paths(self) -> list[Path]: ...


def listed_images(datasets: list[Any]) -> list[Path]:
    """Every image file the datasets read, each once, in order.

    A dataset that cannot list its files is left out: the conversation and grounding loaders
    already decode every image while they load, so their files were checked on the way here.
    """
    seen: dict[Path, None] = {}
    for dataset in datasets:
        if isinstance(dataset, ListsImages):
            seen.update(dict.fromkeys(dataset.image_paths()))
    return list(seen)


def undecodable(paths: list[Path], advance: Callable[[], None]) -> list[str]:
    """`<path>: <problem>` for every file that does not decode fully, in the order given."""
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        problems = []
        for problem in pool.map(_decode_problem, paths):
            advance()
            if problem is not None:
                problems.append(problem)
    return problems


def _decode_problem(path: Path) -> str | None:
    try:
        with open_image(path) as img:
            img.load()
    except ImageError as err:
        return str(err)
    return None


class CheckProgress(TerminalBar):
    """A rich bar on a terminal, a few plain lines elsewhere (CI and SLURM logs), as training's
    progress does; nothing for small sets."""

    def __init__(self, total: int, echo: Callable[[str], None]) -> None:
        self.total = total
        self.echo = echo
        self.done = 0
        self.shown = total >= PROGRESS_FROM
        self.bar: Any = None
        if self.shown and sys.stdout.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

            self.bar = Progress(
                TextColumn("decoding images"), BarColumn(), MofNCompleteColumn(), transient=True
            )
            self.task_id = self.bar.add_task("decode", total=total)

    def advance(self) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update(self.task_id, completed=self.done)
        elif self.shown and self.done * LINES // self.total > (self.done - 1) * LINES // self.total:
            self.echo(f"decoded {self.done}/{self.total} images")
