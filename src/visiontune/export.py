"""Export a trained run as a merged full model, and publish it on the Hugging Face Hub.

A LoRA adapter needs its exact base model and PEFT to be used; a merged model is a plain
transformers checkpoint that any serving stack loads. `export_merged` folds the adapter into
the base weights (PEFT's `merge_and_unload`), saves the model with `save_pretrained` and adds
the task's own files (a VLM's tokenizer, image processor and chat template), so the folder is
complete on its own. `push_to_hub` uploads that folder as it is.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from visiontune.errors import VisiontuneError

log = logging.getLogger(__name__)


def export_merged(run_dir: Path, out_dir: Path, checkpoint: Path | None = None) -> Path:
    """Write the run's best weights (or `checkpoint`) merged into a full model under `out_dir`.

    Refuses a non-empty `out_dir`, so an export never mixes with files of another model.
    """
    from visiontune.api import load_run

    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise VisiontuneError(f"{out_dir} is not empty; export into a new directory")
    loaded = load_run(Path(run_dir), checkpoint)
    cfg, task = loaded.cfg, loaded.task
    loaded.runner.adapter.export_merged(out_dir)
    export_files = getattr(task, "export_files", None)
    if export_files is not None:
        export_files(out_dir)
    if cfg.model.builder is not None:
        source = f"{cfg.model.builder} (your own module)"
    else:
        source = cfg.model.name_or_path or "an inline config (random init)"
    library = "pytorch" if cfg.model.builder is not None else "transformers"
    card = _model_card(source, cfg.task.type, Path(run_dir), library)
    (out_dir / "README.md").write_text(card)
    log.info("merged model written to %s (base: %s)", out_dir, source)
    return out_dir


def _model_card(base: str, task: str, run_dir: Path, library: str) -> str:
    summary = run_dir / "summary.json"
    metrics = ""
    if summary.is_file():
        final = json.loads(summary.read_text()).get("last_eval") or {}
        shown = {k: v for k, v in final.items() if k != "step" and isinstance(v, int | float)}
        metrics = "\n".join(f"- {k}: {v:.4g}" for k, v in shown.items())
    return (
        f"---\nlibrary_name: {library}\ntags: [visiontune, lora-merged]\n---\n\n"
        f"# {run_dir.name}\n\nFine-tuned from `{base}` for the `{task}` task with visiontune "
        "(LoRA, merged into the base weights).\n\n"
        + (f"## Evaluation\n\n{metrics}\n" if metrics else "")
    )


def push_to_hub(
    folder: Path,
    repo_id: str,
    private: bool = True,
    token: str | None = None,
    commit_message: str = "Upload model exported by visiontune",
) -> str:
    """Create `repo_id` if needed and upload `folder` in one commit; returns the commit URL.

    Private by default: publishing a model is a decision the user makes explicitly.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise VisiontuneError(f"{folder} holds no config.json: export a model first")
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        info: Any = api.upload_folder(
            folder_path=str(folder), repo_id=repo_id, commit_message=commit_message
        )
    except (HfHubHTTPError, ValueError) as err:
        first = str(err).strip().splitlines()[0]
        raise VisiontuneError(f"push to {repo_id} failed: {first}") from None
    url = str(getattr(info, "commit_url", info))
    log.info("uploaded %s to %s", folder, url)
    return url
