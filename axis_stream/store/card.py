"""The model card (``README.md`` with the Hugging Face Hub's YAML metadata) written into every export.

It says what the export is and where it came from: the base, the merge (the basis's strategy and
calibration), every source folded into the basis version (name and sha256 from the ledger), and for
an adapted export the job's target and accuracies. Nothing in it depends on when or where it was
written, so two exports of the same version are byte-identical.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from axis_stream.store.basis import Basis

CARD_FILE = "README.md"
LIBRARIES = ("transformers", "open_clip", "peft")


def _scalar(value: Any) -> str:
    """A YAML scalar: JSON's quoting, which YAML reads the same (strings, numbers, booleans, null)."""
    return json.dumps(value, ensure_ascii=False)


def _yaml(value: Any, indent: int = 0) -> list[str]:
    """``value`` (dicts, lists and scalars) as block-style YAML lines."""
    pad = " " * indent
    lines: list[str] = []
    if isinstance(value, Mapping):
        for key, item in value.items():
            if isinstance(item, (Mapping, list)) and item:
                lines += [f"{pad}{key}:", *_yaml(item, indent + 2)]
            else:
                lines.append(f"{pad}{key}: {_scalar(None if isinstance(item, (Mapping, list)) else item)}")
    else:
        for item in value:
            if isinstance(item, Mapping):
                first, *rest = _yaml(item, indent + 2)
                lines += [f"{pad}- {first.lstrip()}", *rest]
            else:
                lines.append(f"{pad}- {_scalar(item)}")
    return lines


def metadata(basis: Basis, version: int, base_model: str, library: str, *, base_pretrained: str | None = None,
             job: Mapping[str, Any] | None = None, adapter: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The card's metadata for basis ``version``: the base, the merge, the sources; ``job`` (a finished
    job's report and id) adds the target and accuracies, ``adapter`` what the LoRA adapter holds."""
    if library not in LIBRARIES:
        raise ValueError(f"library {library!r}: one of {LIBRARIES}")
    manifest = basis.manifest_of(version)
    settings = manifest["settings"]
    calibration = basis.calibration_summary(version)
    tags = ["axis-stream", "model-merging", f"merge-{settings.get('strategy', 'axis')}"]
    tags += ["lora", "svd-adaptation"] if adapter else []
    meta: dict[str, Any] = {"base_model": base_model, "library_name": library, "tags": tags}
    axis: dict[str, Any] = {
        "export": "adapter" if adapter else "full",
        "base_pretrained": base_pretrained,
        "basis_version": version,
        "merge_method": settings.get("strategy", "axis"),
        "merge_params": dict(sorted(settings.get("strategy_params", {}).items())),
        "k_mode": settings.get("k_mode"),
        "calibration": calibration["rule"],
        "calibration_factor": {k: calibration[k] for k in ("min", "median", "max")},
        "sources": [{"name": r.file, "sha256": r.sha256} for r in basis.ledger(version)],
    }
    if job is not None:
        axis["job"] = {"id": job["id"], "target": job.get("target"), "target_name": job.get("target_name"),
                       "n_fraction": job.get("n_fraction"), "seed": job.get("seed"),
                       "validation_accuracy": job.get("val_accuracy"), "test_accuracy": job.get("test_accuracy")}
    if adapter:
        axis["adapter"] = dict(adapter)
    meta["axis_stream"] = axis
    return meta


def render(meta: Mapping[str, Any]) -> str:
    """The card's text: the YAML block, then a few lines a person reads."""
    axis = meta["axis_stream"]
    job = axis.get("job")
    what = (f"basis version {axis['basis_version']} adapted to {job['target_name'] or job['target']} by job "
            f"{job['id']}" if job else f"the merged model of basis version {axis['basis_version']}")
    form = "A LoRA adapter (PEFT) of " if axis["export"] == "adapter" else ""
    lines = ["---", *_yaml(meta), "---", "",
             f"# {meta['base_model']}: {what}", "",
             f"{form}{meta['base_model']} with {len(axis['sources'])} fine-tuned source(s) merged by "
             f"axis-stream ({axis['merge_method']}, calibration {axis['calibration']}).", ""]
    if job:
        lines += [f"Validation accuracy {_percent(job['validation_accuracy'])}, test accuracy "
                  f"{_percent(job['test_accuracy'])} on {job['target']}.", ""]
    adapter = axis.get("adapter") or {}
    if adapter.get("dropped"):
        lines += [f"Not carried by the adapter (no PEFT form): {', '.join(adapter['dropped'])}; "
                  "the full export has them.", ""]
    lines += ["| source | sha256 |", "|---|---|", *[f"| {_cell(s['name'])} | {s['sha256']} |" for s in axis["sources"]], ""]
    return "\n".join(lines)


def _cell(text: str) -> str:
    """A table cell: a ``|`` in a file name would end it."""
    return text.replace("|", "\\|")


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2%}"
