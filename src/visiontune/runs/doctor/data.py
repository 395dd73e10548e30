"""Rules on the data: class imbalance against the loss's class weights, a validation split
too small for the acceptance criteria, skipped samples, images in both train and val."""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from pathlib import Path

from visiontune.config.schema import parse_criterion
from visiontune.runs.doctor.evidence import Evidence, Finding

IMBALANCE = 3.0  # largest over smallest weighted class count
MAX_HALF_WIDTH = 0.05  # of the 95% interval of an acceptance metric at its threshold
TARGET_HALF_WIDTH = 0.02
Z95 = 1.96


def class_imbalance(evidence: Evidence) -> list[Finding]:
    rule = "class imbalance"
    cfg, splits = evidence.cfg, evidence.splits
    labels = getattr(splits.train, "labels", None) if splits is not None else None
    if cfg is None or labels is None or cfg.task.type != "classify":
        return [Finding(rule, "not checked", "needs a classify run whose data loads")]
    classes = list(cfg.data.classes or range(max(labels) + 1))
    counts = Counter(labels)
    spec = cfg.task.loss.class_weights  # type: ignore[union-attr]
    if spec == "balanced":
        weights = [len(labels) / (len(classes) * max(counts[c], 1)) for c in range(len(classes))]
    else:
        weights = list(spec) if spec else [1.0] * len(classes)
    weighted = [weights[c] * counts[c] for c in range(len(classes)) if counts[c]]
    ratio = max(weighted) / min(weighted)
    raw = max(counts.values()) / min(counts.values())
    shown = ", ".join(f"{classes[c]}: {counts[c]}" for c in range(len(classes)))
    text = f"train counts {shown}; task.loss.class_weights {spec}"
    empty = [str(classes[c]) for c in range(len(classes)) if not counts[c]]
    if empty:
        return [Finding(rule, "warn", f"class(es) {', '.join(empty)} have no train samples", text)]
    if ratio > IMBALANCE:
        return [Finding(
            rule, "warn",
            f"classes are {raw:.1f}:1 imbalanced and the loss weights leave {ratio:.1f}:1: the "
            "loss favours the majority; set task.loss.class_weights: balanced and watch "
            "balanced_accuracy", text,
        )]  # fmt: skip
    return [Finding(rule, "ok", f"classes {raw:.1f}:1, {ratio:.1f}:1 after the loss weights", text)]


def validation_size(evidence: Evidence) -> list[Finding]:
    """The 95% interval of a proportion at the acceptance threshold on the eval split: wider
    than +-0.05, a PASS or FAIL there is decided by which samples happen to be in val."""
    rule = "validation size"
    cfg = evidence.cfg
    if cfg is None or not cfg.acceptance:
        return [Finding(rule, "not checked", "no acceptance criteria in the config")]
    findings = []
    for metric, criterion in cfg.acceptance.items():
        _, threshold = parse_criterion(criterion)
        n = evidence.eval_samples(metric)
        if not n or not 0 <= threshold <= 1:
            findings.append(Finding(rule, "not checked", f"{metric}: the precision is known only "
                                    "for proportion metrics with data that loads"))  # fmt: skip
            continue
        p = min(max(threshold, 0.5 / n), 1 - 0.5 / n)
        half = Z95 * math.sqrt(p * (1 - p) / n)
        needed = math.ceil(Z95**2 * p * (1 - p) / TARGET_HALF_WIDTH**2)
        text = (
            f"{metric} {criterion} judged on {n} samples: 95% interval at the threshold "
            f"+-{half:.3f}; +-{TARGET_HALF_WIDTH} needs about {needed} samples"
        )
        if half > MAX_HALF_WIDTH:
            findings.append(Finding(
                rule, "warn", f"{metric}: {n} samples cannot tell {threshold:g} from "
                f"{threshold - half:.2f} or {threshold + half:.2f}; enlarge the split", text,
            ))  # fmt: skip
        else:
            findings.append(Finding(rule, "ok", f"{metric}: +-{half:.3f} on {n} samples", text))
    return findings


def skipped_samples(evidence: Evidence) -> list[Finding]:
    rule = "skipped samples"
    lines = [line for line in evidence.log_lines if "skipped sample " in line]
    count = evidence.summary.get("skipped_samples")
    if count is None and not evidence.log_lines:
        return [Finding(rule, "not checked", "no summary.json and no train.log")]
    count = max(count or 0, len(lines))
    if count:
        shown = "; ".join(line.split("skipped sample ", 1)[1] for line in lines[:3])
        return [Finding(
            rule, "warn", f"{count} sample(s) could not be loaded and were skipped",
            shown or "see train.log",
        )]  # fmt: skip
    return [Finding(rule, "ok", "no sample was skipped")]


def duplicate_images(evidence: Evidence) -> list[Finding]:
    """Same bytes in train and val: validation then scores memorised images."""
    rule = "train/val duplicates"
    splits, cfg = evidence.splits, evidence.cfg
    if splits is None or cfg is None:
        return [Finding(rule, "not checked", "needs config.yaml and data that loads")]
    train, held = splits.train, splits.get(cfg.eval.split)
    if held is None or not all(hasattr(d, "image_paths") for d in (train, held)):
        return [Finding(rule, "not checked", "the data cannot list its image files")]
    train_hashes = {_digest(p): p for p in train.image_paths()}
    held_paths = held.image_paths()
    both = [(train_hashes[h], p) for p in held_paths if (h := _digest(p)) in train_hashes]
    text = f"sha256 of {len(train_hashes)} train and {len(held_paths)} {cfg.eval.split} files"
    if both:
        pairs = "; ".join(f"{a} = {b}" for a, b in both[:3])
        return [Finding(
            rule, "warn",
            f"{len(both)} {cfg.eval.split} image(s) are byte-identical to train images: the "
            "evaluation scores memorised images", f"{text}: {pairs}",
        )]  # fmt: skip
    return [Finding(rule, "ok", f"no {cfg.eval.split} image is also in train", text)]


def _digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
