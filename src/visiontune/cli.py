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
runs_app = typer.Typer(help="The attempts ledger: list, show, diff, best, log, report.")
app.add_typer(runs_app, name="runs")

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
    allow_duplicate: Annotated[
        bool, typer.Option(help="Train even if these settings already ran on this data.")
    ] = False,
    nproc: Annotated[
        int | None, typer.Option(help="Ranks on this machine: runs torchrun's launcher.")
    ] = None,
) -> None:
    """Train. Exit code 75 means: stopped by a signal or time limit, checkpoint saved, resume."""
    from visiontune import api
    from visiontune.config import load_config
    from visiontune.engine import distributed, launch
    from visiontune.runs.slurm import requeue_if_asked

    cfg = load_config(config, overrides)  # errors before any rank starts
    if nproc is not None and not distributed.launched():
        distributed.resolve_batch(cfg, nproc)
        argv = launch.worker_argv(launch.command_line())
        raise typer.Exit(launch.run_torchrun(nproc, argv))
    result = api.train(cfg, resume=resume, overwrite=overwrite, allow_duplicate=allow_duplicate)
    summary = result.summary
    if not summary:  # a rank other than 0: rank 0 reports
        raise typer.Exit(launch.rank_exit_code(result.exit_code))
    typer.echo(f"status: {summary['status']} after {summary['steps']} steps")
    best = summary["best"]
    if best["value"] is not None:
        typer.echo(f"best {best['metric']}: {best['value']:.4f} at step {best['step']}")
    if summary["accepted"] is not None:
        typer.echo(f"acceptance: {'PASS' if summary['accepted'] else 'FAIL'}")
    typer.echo(f"run directory: {summary['run_dir']}")
    requeue_if_asked(result.exit_code)
    raise typer.Exit(launch.rank_exit_code(result.exit_code))


@config_app.command("show")
@friendly
def config_show(
    config: Path,
    overrides: Overrides = None,
    nproc: Annotated[int | None, typer.Option(help="World size to resolve the batch for.")] = None,
) -> None:
    """Print the resolved config (defaults filled in, overrides applied) and its global batch."""
    from visiontune.config import load_config
    from visiontune.config.load import dump_yaml
    from visiontune.engine import distributed

    world = nproc or distributed.planned_world_size()
    cfg = distributed.resolve_batch(load_config(config, overrides), world)
    typer.echo(dump_yaml(cfg), nl=False)
    typer.echo(f"# {distributed.global_batch_line(cfg.train, world)}")


@config_app.command("import-llamafactory")
@friendly
def config_import_llamafactory(
    config: Path,
    dataset_info: Annotated[
        Path | None,
        typer.Option(help="LLaMA-Factory's data/dataset_info.json (default: dataset_dir's)."),
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Write here (never overwritten).")
    ] = None,
) -> None:
    """Write a visiontune ground-task config from a LLaMA-Factory training YAML, listing every
    key that was not mapped and why."""
    from visiontune.config.llamafactory import import_llamafactory
    from visiontune.errors import VisiontuneError

    imported = import_llamafactory(config, dataset_info)
    text = imported.to_yaml(config)
    if out is None:
        typer.echo(text, nl=False)
    elif out.exists():
        raise VisiontuneError(f"{out} exists; choose a new file name")
    else:
        out.write_text(text, encoding="utf-8")
        typer.echo(f"wrote {out}")
    for key, reason in imported.unmapped.items():
        typer.echo(f"not mapped: {key}: {reason}", err=True)


@config_app.command("check")
@friendly
def config_check(config: Path, overrides: Overrides = None) -> None:
    """Validate the config and the data it points at, decoding every image, without training."""
    from visiontune import api
    from visiontune.config import load_config
    from visiontune.data.verify import CheckProgress, ListsImages, listed_images, undecodable
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
    # conversation, grounding and paired-raster loaders read every file while they load
    read = [name for name, ds in datasets.items() if not isinstance(ds, ListsImages)]
    loaded = f"; {', '.join(read)}: every file read while loading" if read else ""
    typer.echo(f"{config}: OK ({sizes}; {len(images)} image files decoded{loaded})")


@app.command()
@friendly
def plan(
    config: Annotated[Path, typer.Argument(help="YAML config file.")],
    overrides: Overrides = None,
    memory: Annotated[
        str | None, typer.Option(help="Memory budget, e.g. 8GiB: search what fits it.")
    ] = None,
    time: Annotated[
        str | None, typer.Option(help="Time limit, e.g. 8h (default: train.time_limit).")
    ] = None,
    steps: Annotated[int, typer.Option(min=2, help="Optimizer steps measured.")] = 5,
    compare: Annotated[
        str | None, typer.Option(help="Measure each value of a key: lora.rank=16,32,64")
    ] = None,
) -> None:
    """Measure real optimizer steps: peak memory and its parts, step time, the predicted run
    time against the time limit; with --memory, the micro-batch and the changes that fit."""
    from visiontune import api
    from visiontune.config import load_config
    from visiontune.config.schema import parse_duration
    from visiontune.engine.plan import describe, make_plan, parse_size
    from visiontune.errors import ConfigError

    cfg = load_config(config, overrides)
    api.make_task(cfg).datasets()  # the config check's data errors, before any measuring
    try:
        budget = parse_size(memory) if memory else None
        if time:
            parse_duration(time)
    except ValueError as err:
        raise ConfigError([str(err)], source="plan options") from None
    compared = None
    if compare:
        key, sep, values = compare.partition("=")
        if not sep or not values:
            raise ConfigError([f"--compare {compare!r}: use key=v1,v2"], source="plan options")
        compared = (key, values.split(","))
    result = make_plan(cfg, steps, budget, time, compared, say=typer.echo)
    for line in describe(result, budget):
        typer.echo(line)


@app.command()
@friendly
def slurm(
    config: Annotated[Path, typer.Argument(help="YAML config file.")],
    overrides: Overrides = None,
    time: Annotated[str, typer.Option(help="Job time limit: 8:00:00, 1-12:00:00 or 7h50m.")] = "",
    gpus_per_node: Annotated[int, typer.Option(min=1, help="GPUs (ranks) per node.")] = 1,
    nodes: Annotated[int, typer.Option(min=1, help="Nodes.")] = 1,
    account: Annotated[str | None, typer.Option(help="sbatch --account.")] = None,
    partition: Annotated[str | None, typer.Option(help="sbatch --partition.")] = None,
    signal_margin: Annotated[
        int, typer.Option(min=1, help="Seconds before the limit that USR1 comes.")
    ] = 300,
    step_time: Annotated[
        float | None, typer.Option(help="Seconds per step measured on the cluster (no probe).")
    ] = None,
    save_time: Annotated[float, typer.Option(help="Seconds per save, with --step-time.")] = 0.0,
    out: Annotated[
        Path | None, typer.Option(help="Script path (default OUTPUT_DIR/NAME.sbatch).")
    ] = None,
    submit: Annotated[bool, typer.Option(help="Run sbatch on the script.")] = False,
) -> None:
    """Write an sbatch script that trains with torchrun across nodes, saves and requeues
    itself before its time limit, and resumes; with --submit, submit it."""
    from visiontune import api
    from visiontune.config import load_config
    from visiontune.errors import ConfigError
    from visiontune.runs import slurm as sl

    cfg = load_config(config, overrides)
    try:
        time_s = sl.parse_slurm_time(time) if time else None
    except ValueError as err:
        raise ConfigError([str(err)], source="visiontune slurm") from None
    if time_s is None:
        raise ConfigError(["--time is required, e.g. --time 8:00:00"], source="visiontune slurm")
    job = sl.SlurmJob(
        config, list(overrides or []), time_s, gpus_per_node, nodes, account, partition,
        signal_margin,
    )  # fmt: skip
    api.make_task(cfg).datasets()  # the config check's data errors, before any measuring
    if step_time is not None:
        timing = sl.given_timing(cfg, step_time, save_time, sl.total_steps(cfg))
    else:
        typer.echo("measuring 3 optimizer steps in a fresh process (or pass --step-time) ...")
        timing = sl.measured_timing(cfg)
    for line in sl.check_job(job, cfg, timing):
        typer.echo(line)
    script = out or cfg.output_dir / f"{cfg.name}.sbatch"
    text = sl.render(job, cfg, (cfg.output_dir / f"{cfg.name}.slurm-%j.out").resolve())
    aside = sl.write_script(script, text)
    if aside is not None:
        typer.echo(f"the earlier {script} differed: kept as {aside}")
    typer.echo(f"wrote {script}")
    if submit:
        typer.echo(sl.submit(script))
    else:
        typer.echo(f"submit with: sbatch {script}")


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
    score_threshold: Annotated[
        float | None, typer.Option(help="SAM 3: keep instances scoring at least this.")
    ] = None,
    mask_threshold: Annotated[
        float | None, typer.Option(help="SAM 3: mask logit cut-off (0.0 = probability 0.5).")
    ] = None,
    box: Annotated[
        list[str] | None, typer.Option(help="SAM 3: exemplar box x1,y1,x2,y2 in pixels.")
    ] = None,
    negative_box: Annotated[
        list[str] | None, typer.Option(help="SAM 3: negative exemplar box x1,y1,x2,y2.")
    ] = None,
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
    cuts = {"score_threshold": score_threshold, "mask_threshold": mask_threshold}
    records = [{**r, **{k: v for k, v in cuts.items() if v is not None}} for r in records]
    exemplars = [(b, 1) for b in box or []] + [(b, 0) for b in negative_box or []]
    if exemplars:
        boxes = [parse_box(b) for b, _ in exemplars]
        records = [{**r, "boxes": boxes, "box_labels": [k for _, k in exemplars]} for r in records]
    results = api.predict(run, records, out, checkpoint=checkpoint)
    path = write_predictions(results, out, output_format)
    for result in results[:20]:
        typer.echo(json.dumps({k: v for k, v in result.items() if k != "probabilities"}))
    typer.echo(f"wrote {len(results)} predictions to {path}")


def parse_box(text: str) -> list[float]:
    """`x1,y1,x2,y2` as four numbers, or an error naming the option."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != 4:
        raise typer.BadParameter(f"--box {text!r}: give x1,y1,x2,y2 (four numbers)")
    return values


Root = Annotated[Path, typer.Option("--root", help="The runs root (a config's output_dir).")]


@runs_app.callback(invoke_without_command=True)
def runs_main(ctx: typer.Context) -> None:
    """Every run under a runs root, read from the run directories (no shared file)."""
    if ctx.invoked_subcommand is None:
        runs_list(Path("runs"), None)


@runs_app.command("list")
@friendly
def runs_list(
    root: Root = Path("runs"),
    sort: Annotated[str | None, typer.Option(help="Order by this metric, best first.")] = None,
) -> None:
    """One table per task (and selection metric): status, steps, best metric, and a column
    only for each setting that differs; unreadable records are listed with their paths."""
    from rich.console import Console

    from visiontune.runs import attempts, ledger

    found = attempts.scan_or_fail(root)
    records = attempts.sorted_by(found.records, sort) if sort else found.records
    console = Console()
    for table in ledger.tables(records):
        console.print(table.to_rich(console.width))
    for path, reason in found.unreadable:
        typer.secho(f"unreadable run record {path}: {reason}", fg="yellow")


@runs_app.command("show")
@friendly
def runs_show(
    run: Annotated[str, typer.Argument(help="Run name or directory.")], root: Root = Path("runs")
) -> None:
    """One run's record: status, times, cost, data, code, metrics at its best evaluation."""
    from visiontune.runs import attempts

    record = attempts.find_run(root, run)
    for key in (
        "name",
        "status",
        "run_dir",
        "task",
        "steps",
        "config_hash",
        "version",
        "git_commit",
    ):
        typer.echo(f"{key:12s} {record.get(key)}")
    typer.echo(f"{'dataset':12s} {record['dataset']}")
    typer.echo(f"{'cost':12s} {record.get('cost')} ({record.get('gpu_hours')} device-hours)")
    for name, value in attempts.metrics_at_best(record).items():
        typer.echo(f"  {name:30s} {value:.4f}")
    for line in attempts.criteria_lines(record):
        typer.echo(line)


@runs_app.command("diff")
@friendly
def runs_diff(
    a: Annotated[str, typer.Argument(help="Run name or directory.")],
    b: Annotated[str | None, typer.Argument(help="The other run.")] = None,
    best: Annotated[bool, typer.Option("--best", help="Compare with the best run.")] = False,
    root: Root = Path("runs"),
) -> None:
    """Settings and metrics that differ, and whether each metric change exceeds the noise."""
    from visiontune.errors import VisiontuneError
    from visiontune.runs import attempts

    first = attempts.find_run(root, a)
    if best:
        other = attempts.best_run(attempts.scan(root).records)
        if other is None:
            raise VisiontuneError(f"no finished run with a metric under {root}")
        if other["run_dir"] == first["run_dir"]:
            typer.echo(f"{first['name']} is the best run")
            return
        first, second = other, first
    elif b is None:
        raise VisiontuneError("runs diff: give two runs, or one and --best")
    else:
        second = attempts.find_run(root, b)
    for line in attempts.diff_lines(first, second):
        typer.echo(line)


@runs_app.command("best")
@friendly
def runs_best(
    root: Root = Path("runs"),
    metric: Annotated[str | None, typer.Option(help="Instead of the selection metric.")] = None,
) -> None:
    """The best finished run and its settings."""
    from visiontune.runs import attempts

    records = attempts.scan_or_fail(root).records
    if metric:
        attempts.check_metric(records, metric)
    best = attempts.best_run(records, metric)
    if best is None:
        typer.echo(f"no finished run with a metric under {root}")
        return
    name = metric or best["metric"]
    typer.echo(f"{best['name']}: {name} {attempts.metrics_at_best(best)[name]:.4f}")
    typer.echo(f"run directory: {best['run_dir']}")


@runs_app.command("report")
@friendly
def runs_report(root: Root = Path("runs")) -> None:
    """Write ROOT/report.html: the runs table, the best run, the attempts log, the curves."""
    from visiontune.runs import attempts
    from visiontune.runs.html import root_report

    attempts.scan_or_fail(root)
    typer.echo(f"wrote {root_report(root)}")


@runs_app.command("log")
@friendly
def runs_log(
    root: Root = Path("runs"),
    out: Annotated[
        Path | None, typer.Option(help="Markdown file (default ROOT/ATTEMPTS.md).")
    ] = None,
) -> None:
    """Write the markdown attempts log: best run, every attempt against it, spend, criteria."""
    from visiontune.runs import attempts

    attempts.scan_or_fail(root)
    path = out or root / "ATTEMPTS.md"
    path.write_text(attempts.attempts_log(root))
    typer.echo(f"wrote {path}")


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


@app.command()
@friendly
def report(run: Annotated[Path, typer.Argument(help="Run directory.")]) -> None:
    """Write RUN/report.html: curves, metrics with 95% intervals, criteria, pictures, inline."""
    from visiontune.runs.html import run_report

    typer.echo(f"wrote {run_report(run)}")


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
