"""`visiontune doctor RUN`: what a run's curves, data and settings mean, with the numbers.

Each rule reads the run's own records (metrics.jsonl, eval.jsonl, config.yaml, train.log,
summary.json and, where the data still loads, the splits) and either passes with its number,
warns with its evidence, or says why it could not check. A run still writing, one killed
mid-line, or one written by an older visiontune is diagnosed as far as its records allow.
"""

from __future__ import annotations

from pathlib import Path

from visiontune.runs.doctor import curves, data, evals, settings
from visiontune.runs.doctor.evidence import Evidence, Finding, Report, load_evidence

__all__ = ["Evidence", "Finding", "Report", "diagnose"]

RULES = [
    curves.loss_noise,
    curves.learning_rate,
    curves.clipping,
    curves.divergence,
    curves.plateau,
    evals.train_val_gap,
    evals.early_stop_noise,
    evals.patience_vs_noise,
    data.class_imbalance,
    data.validation_size,
    data.skipped_samples,
    data.duplicate_images,
    settings.lora_scale,
    settings.lora_learning_rate,
    settings.warmup_length,
]


def diagnose(run_dir: Path, figure: bool = True) -> Report:
    """Every rule on the run in `run_dir`; with `figure`, also figures/doctor.png."""
    evidence = load_evidence(Path(run_dir))
    report = Report(run_dir=Path(run_dir), notes=list(evidence.notes))
    for rule in RULES:
        report.findings.extend(rule(evidence))
    if figure and evidence.steps:
        from visiontune.runs.doctor.figure import plot_doctor

        report.figure = plot_doctor(evidence, report)
    return report
