"""Thin command line: parse, load the config, call the api, print.

torch and transformers are imported inside the commands, so `visiontune --help` answers at once.
Errors a user can fix print as one message (exit 2 for config and data problems, 1 otherwise);
the traceback appears only with `--debug`.
"""

from __future__ import annotations

import csv
import functools
import json
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

app = typer.Typer(
    help="LoRA fine-tuning of vision and vision-language models, correct by default.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="Show or check a config without training.", no_args_is_help=True)
app.add_typer(config_app, name="config")

_debug = False
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}

Overrides = Annotated[list[str] | None, typer.Argument(help="Dotted overrides: optim.lr=5e-5")]


@app.callback()
def main_options(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks.")] = False,
) -> None:
    global _debug
    _debug = debug


def friendly(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn VisiontuneError into one clear message and an exit code."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from visiontune.errors import ConfigError, DataError, VisiontuneError

        try:
            return command(*args, **kwargs)
        except VisiontuneError as err:
            if _debug:
                raise
            typer.secho(f"error: {err}", fg="red", err=True)
            raise typer.Exit(2 if isinstance(err, ConfigError | DataError) else 1) from None

    return wrapper


@app.command()
@friendly
def train(
    config: Annotated[Path, typer.Argument(help="YAML config file.")],
    overrides: Overrides = None,
    resume: Annotated[bool, typer.Option(help="Continue from the latest checkpoint.")] = False,
    overwrite: Annotated[
        bool, typer.Option(help="Start again; the existing run dir is renamed aside.")
    ] = False,
) -> None:
    """Train. Exit code 75 means: stopped by a signal or time limit, checkpoint saved, resume."""
    from visiontune import api
    from visiontune.config import load_config

    result = api.train(load_config(config, overrides), resume=resume, overwrite=overwrite)
    summary = result.summary
    typer.echo(f"status: {summary['status']} after {summary['steps']} steps")
    best = summary["best"]
    if best["value"] is not None:
        typer.echo(f"best {best['metric']}: {best['value']:.4f} at step {best['step']}")
    if summary["accepted"] is not None:
        typer.echo(f"acceptance: {'PASS' if summary['accepted'] else 'FAIL'}")
    typer.echo(f"run directory: {summary['run_dir']}")
    raise typer.Exit(result.exit_code)


@config_app.command("show")
@friendly
def config_show(config: Path, overrides: Overrides = None) -> None:
    """Print the resolved config (defaults filled in, overrides applied)."""
    from visiontune.config import load_config
    from visiontune.config.load import dump_yaml

    typer.echo(dump_yaml(load_config(config, overrides)), nl=False)


@config_app.command("check")
@friendly
def config_check(config: Path, overrides: Overrides = None) -> None:
    """Validate the config and the data it points at, decoding every image, without training."""
    from visiontune import api
    from visiontune.config import load_config
    from visiontune.data.verify import CheckProgress, listed_images, undecodable
    from visiontune.errors import DataError

    cfg = load_config(config, overrides)
    splits = api.make_task(cfg).datasets()
    datasets = {name: ds for name in ("train", "val", "test") if (ds := splits.get(name))}
    images = listed_images(list(datasets.values()))
    with CheckProgress(len(images), typer.echo) as progress:
        unreadable = undecodable(images, progress.advance)
    if unreadable:
        raise DataError.listing(unreadable, str(config), noun="unreadable image(s)")
    sizes = ", ".join(f"{name}: {len(ds)} samples" for name, ds in datasets.items())
    typer.echo(f"{config}: OK ({sizes}; {len(images)} image files decoded)")


@app.command("eval")
@friendly
def evaluate(
    run: Annotated[Path, typer.Argument(help="Run directory.")],
    split: Annotated[str, typer.Option(help="val or test")] = "val",
    checkpoint: Annotated[Path | None, typer.Option(help="A checkpoint instead of best/.")] = None,
) -> None:
    """Score best/ (or a checkpoint) on a split; prints and saves the metrics."""
    from visiontune import api

    metrics, out = api.evaluate(run, split=split, checkpoint=checkpoint)
    for key, value in metrics.scalars.items():
        typer.echo(f"{key:32s} {value:.4f}")
    typer.echo(f"saved to {out}")


@app.command()
@friendly
def doctor(run: Annotated[Path, typer.Argument(help="Run directory.")]) -> None:
    """What a run's curves, data and settings mean: findings with their numbers and a figure
    (figures/doctor.png); also on a run still training or one killed mid-write."""
    from visiontune.runs.doctor import diagnose

    typer.echo(diagnose(run).text())


@app.command()
@friendly
def predict(
    run: Annotated[Path, typer.Argument(help="Run directory.")],
    inputs: Annotated[list[Path] | None, typer.Argument(help="Image files or folders.")] = None,
    image: Annotated[list[Path] | None, typer.Option(help="An image (repeatable).")] = None,
    text: Annotated[str | None, typer.Option(help="Text prompt (segmentation).")] = None,
    prompt: Annotated[str | None, typer.Option(help="Instruction (grounding).")] = None,
    out: Annotated[Path, typer.Option(help="Where predictions go.")] = Path("predictions"),
    output_format: Annotated[str, typer.Option("--format", help="json or csv")] = "json",
    checkpoint: Annotated[Path | None, typer.Option(help="A checkpoint instead of best/.")] = None,
) -> None:
    """Predict for image files or folders; writes predictions.json or .csv (and pictures)."""
    from visiontune import api
    from visiontune.errors import VisiontuneError

    files = expand_images([*(inputs or []), *(image or [])])
    if not files:
        raise VisiontuneError("predict: give image files or folders (or --image)")
    if output_format not in {"json", "csv"}:
        raise VisiontuneError(f"--format must be json or csv, not {output_format!r}")
    records = [{"image": str(f), "text": text or prompt} for f in files]
    results = api.predict(run, records, out, checkpoint=checkpoint)
    path = write_predictions(results, out, output_format)
    for result in results[:20]:
        typer.echo(json.dumps({k: v for k, v in result.items() if k != "probabilities"}))
    typer.echo(f"wrote {len(results)} predictions to {path}")


@app.command()
@friendly
def runs(
    output_dir: Annotated[Path, typer.Argument(help="Where the runs live.")] = Path("runs"),
) -> None:
    """The ledger: every run with its status, best metric and the settings that differ,
    one table per task."""
    from rich.console import Console

    from visiontune.runs import ledger

    entries = ledger.read(output_dir)
    if not entries:
        typer.echo(f"no runs recorded in {output_dir / ledger.LEDGER}")
        return
    console = Console()
    for table in ledger.tables(entries):
        console.print(table.to_rich(console.width))


@app.command()
@friendly
def export(
    run: Annotated[Path, typer.Argument(help="Run directory.")],
    merge: Annotated[Path, typer.Option(help="Write base + LoRA merged into this new dir.")],
    push_to_hub: Annotated[
        str | None, typer.Option(help="Then upload it to this Hub repo (user/name).")
    ] = None,
    public: Annotated[bool, typer.Option(help="Create the Hub repo public.")] = False,
    checkpoint: Annotated[Path | None, typer.Option(help="A checkpoint instead of best/.")] = None,
) -> None:
    """Merge the LoRA weights into a full model that plain transformers loads; optionally push."""
    from visiontune.export import export_merged
    from visiontune.export import push_to_hub as upload

    out = export_merged(run, merge, checkpoint=checkpoint)
    typer.echo(f"merged model written to {out}")
    if push_to_hub:
        typer.echo(f"uploaded: {upload(out, push_to_hub, private=not public)}")


def expand_images(paths: list[Path]) -> list[Path]:
    from visiontune.errors import VisiontuneError

    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES))
        elif path.is_file():
            files.append(path)
        else:
            raise VisiontuneError(f"predict: {path} does not exist")
    return files


def write_predictions(results: list[dict[str, Any]], out: Path, output_format: str) -> Path:
    path = out / f"predictions.{output_format}"
    if output_format == "json":
        path.write_text(json.dumps(results, indent=2))
        return path
    flat = [{k: v for k, v in r.items() if not isinstance(v, dict | list)} for r in results]
    for row, result in zip(flat, results, strict=True):
        for key, value in (result.get("probabilities") or {}).items():
            row[f"p_{key}"] = value
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(flat[0]))
        writer.writeheader()
        writer.writerows(flat)
    return path


def main() -> None:
    # Deprecation notices between our dependencies (PEFT calling a renamed transformers
    # method) are nothing a user can act on; they would only bury the training log.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*deprecated")
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
