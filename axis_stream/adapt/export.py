"""Export full weights as an open_clip state dict in safetensors: a finished Stage 2 job, or the basis itself.

``open_clip.create_model(name, pretrained=FILE)`` loads the file; with the job's ``head.safetensors``
(normalised image features times the head) a job's export gives the job's predictions. The merged
export is the knowledge base usable without Stage 2: the base plus ``U diag(s) V^T`` of every basis
matrix at its stored singular values, plus the averaged parameters.
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


def export_job(job_dir: Path, out: Path, cfg: Config) -> Path:
    """Rebuild job ``job_dir``'s model from the base, its basis version and its Lambda; write it to ``out``."""
    report, lambdas = read_job(job_dir)
    if report["base"]["model"] != cfg.base.model:
        raise AdaptError(f"{job_dir}: the job adapted {report['base']['model']}, the config's base is {cfg.base.model}")
    base = models.create_base(cfg.base)
    if models.weights_sha256(base.state_dict()) != report["base"]["sha256"]:
        raise AdaptError(f"{job_dir}: the job was trained on other base weights than {cfg.base.pretrained!r}")
    snapshot = Basis.open(cfg.paths.basis_dir, base.state_dict()).load(report["basis_version"])
    return write_adapted(base, snapshot, report, lambdas, out)


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
                  out: Path) -> Path:
    """Write ``base`` adapted by ``snapshot`` and ``lambdas`` (consumes ``base``) crash-safely to ``out``."""
    _check_out(out)
    model = SVDAdapted(base, snapshot.factors, snapshot.means, report["n_fraction"], seed=report["seed"])
    model.load_lambdas(lambdas, source=LAMBDA_FILE)
    meta = {"basis_version": str(report["basis_version"]), "n_fraction": repr(report["n_fraction"]),
            "target": str(report.get("target", ""))}
    return _write_state(out, model.merged_state_dict(), meta)


def export_merged(out: Path, cfg: Config, version: int | None = None) -> Path:
    """Write the base plus basis version ``version`` (default: the current) at its stored values to ``out``."""
    _check_out(out)
    basis = Basis.open(cfg.paths.basis_dir, models.create_base(cfg.base).state_dict())
    version = basis.version if version is None else version
    meta = {"basis_version": str(version), "kind": "merged"}
    return _write_state(out, basis.materialize(version, with_base=True), meta)


def _check_out(out: Path) -> None:
    out = Path(out)
    if out.suffix != ".safetensors":
        raise AdaptError(f"{out}: the export must end in .safetensors (open_clip picks its loader by suffix)")
    if not out.parent.is_dir():
        raise AdaptError(f"{out}: folder {out.parent} does not exist")


def _write_state(out: Path, state: Mapping[str, Tensor], meta: Mapping[str, str]) -> Path:
    return atomic_write(Path(out), lambda p: save_file(dict(state), str(p), metadata=dict(meta)))
