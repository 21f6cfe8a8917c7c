"""Export a finished Stage 2 job as the full adapted weights: an open_clip state dict in safetensors,
or for a transformers CLIP base a Hugging Face folder (the base folder's config and tokenizer).

``open_clip.create_model(name, pretrained=FILE)`` (or ``CLIPModel.from_pretrained(FOLDER)``) loads it;
with the job's ``head.safetensors`` (normalised image features times the head) it gives the job's
predictions.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from axis_stream.adapt.model import AdaptError, SVDAdapted
from axis_stream.adapt.recipe import LAMBDA_FILE, REPORT_FILE, Snapshot
from axis_stream.config import Config
from axis_stream.store import models
from axis_stream.store.atomic import atomic_write
from axis_stream.store.basis import Basis
from axis_stream.store.export import write_hf_folder


def export_job(job_dir: Path, out: Path, cfg: Config) -> Path:
    """Rebuild job ``job_dir``'s model from the base, its basis version and its Lambda; write it to ``out``."""
    report, lambdas = read_job(job_dir)
    if report["base"]["model"] != cfg.base.model:
        raise AdaptError(f"{job_dir}: the job adapted {report['base']['model']}, the config's base is {cfg.base.model}")
    base = models.create_base(cfg.base)
    if models.weights_sha256(base.state_dict()) != report["base"]["sha256"]:
        raise AdaptError(f"{job_dir}: the job was trained on other base weights than {cfg.base.pretrained!r}")
    snapshot = Basis.open(cfg.paths.basis_dir, base.state_dict()).load(report["basis_version"])
    folder = models.hf_model_dir(cfg.base) if cfg.base.kind == "transformers" else None
    return write_adapted(base, snapshot, report, lambdas, out, base_folder=folder)


def read_job(job_dir: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """A finished job's report and Lambda; a clear error when the folder is not one."""
    report_path, lambda_path = job_dir / REPORT_FILE, job_dir / LAMBDA_FILE
    if not report_path.is_file() or not lambda_path.is_file():
        raise AdaptError(f"{job_dir}: not a finished adapt job (needs {REPORT_FILE} and {LAMBDA_FILE})")
    try:
        report = json.loads(report_path.read_text())
        lambdas = load_file(lambda_path)
    except (ValueError, SafetensorError) as exc:
        raise AdaptError(f"{job_dir}: unreadable job files: {exc}") from None
    missing = [k for k in ("basis_version", "n_fraction", "seed", "base") if k not in report]
    if missing:
        raise AdaptError(f"{report_path}: missing {', '.join(missing)}")
    return report, lambdas


def write_adapted(base: nn.Module, snapshot: Snapshot, report: Mapping[str, Any], lambdas: Mapping[str, Tensor],
                  out: Path, base_folder: Path | None = None) -> Path:
    """Write ``base`` adapted by ``snapshot`` and ``lambdas`` (consumes ``base``) crash-safely to ``out``;
    with ``base_folder`` (a transformers base's), ``out`` is a new Hugging Face folder with its files."""
    out = Path(out)
    if base_folder is None and out.suffix != ".safetensors":
        raise AdaptError(f"{out}: the export must end in .safetensors (open_clip picks its loader by suffix)")
    if not out.parent.is_dir():
        raise AdaptError(f"{out}: folder {out.parent} does not exist")
    model = SVDAdapted(base, snapshot.factors, snapshot.means, report["n_fraction"], seed=report["seed"])
    model.load_lambdas(lambdas, source=LAMBDA_FILE)
    state = model.merged_state_dict()
    meta = {"basis_version": str(report["basis_version"]), "n_fraction": repr(report["n_fraction"]),
            "target": str(report.get("target", ""))}
    if base_folder is not None:
        return write_hf_folder(state, base_folder, out, meta)
    return atomic_write(out, lambda p: save_file(state, str(p), metadata=meta))
