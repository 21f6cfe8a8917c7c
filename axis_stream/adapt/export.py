"""Export a finished Stage 2 job: the full adapted weights (an open_clip state dict in safetensors, or
for a transformers CLIP base a Hugging Face folder with the base folder's config and tokenizer), or
with ``adapter`` a PEFT LoRA adapter of the base (``store.adapter``); a model card (``store.card``)
with each.

``open_clip.create_model(name, pretrained=FILE)`` (or ``CLIPModel.from_pretrained(FOLDER)``, or
``PeftModel.from_pretrained(base, FOLDER)``) loads it; with the job's ``head.safetensors``
(normalised image features times the head) it gives the job's predictions.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from axis_stream.adapt.model import AdaptError, SVDAdapted
from axis_stream.adapt.recipe import LAMBDA_FILE, REPORT_FILE, Snapshot
from axis_stream.config import Config
from axis_stream.store import adapter as lora
from axis_stream.store import card, models
from axis_stream.store.basis import Basis
from axis_stream.store.export import Say, check_out, write_file, write_hf_folder


def export_job(job_dir: Path, out: Path, cfg: Config, *, adapter: bool = False,
               say: Say = lambda line: None) -> tuple[Path, int]:
    """Rebuild job ``job_dir``'s model from the base, its basis version and its Lambda; write it (or with
    ``adapter`` its change as a LoRA adapter) to ``out``; returns the path and the basis version."""
    report, lambdas = read_job(job_dir)
    if report["base"]["model"] != cfg.base.model:
        raise AdaptError(f"{job_dir}: the job adapted {report['base']['model']}, the config's base is {cfg.base.model}")
    if adapter and cfg.base.kind != "transformers":
        raise AdaptError(f"{out}: --adapter needs a Hugging Face (transformers) base; an open_clip base exports "
                         f"the full model")
    check_out(Path(out))
    say(f"building the base {cfg.base.model}")
    base = models.create_base(cfg.base)
    if models.weights_sha256(base.state_dict()) != report["base"]["sha256"]:
        raise AdaptError(f"{job_dir}: the job was trained on other base weights than {cfg.base.pretrained!r}")
    say(f"reading basis version {report['basis_version']}")
    basis = Basis.open(cfg.paths.basis_dir, base.state_dict())
    snapshot = basis.load(report["basis_version"])
    library = "peft" if adapter else "transformers" if cfg.base.kind == "transformers" else "open_clip"
    job = {**report, "id": job_dir.name}

    def text(summary: Mapping[str, Any] | None = None) -> str:
        return card.render(card.metadata(basis, snapshot.version, cfg.base.model, library,
                                         base_pretrained=cfg.base.pretrained, job=job, adapter=summary))

    folder = models.hf_model_dir(cfg.base) if cfg.base.kind == "transformers" else None
    say(f"writing {out}")
    if adapter:
        plan = write_job_adapter(base, snapshot, report, lambdas, Path(out), cfg.base.model, text)
        if plan.dropped:
            say(f"not in the adapter (no PEFT form; the full export has them): {', '.join(plan.dropped)}")
        return Path(out), snapshot.version
    return write_adapted(base, snapshot, report, lambdas, out, text(), base_folder=folder), snapshot.version


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


def _adapted(base: nn.Module, snapshot: Snapshot, report: Mapping[str, Any],
             lambdas: Mapping[str, Tensor]) -> SVDAdapted:
    """The job's model (consumes ``base``): the snapshot's factors with the job's Lambda."""
    model = SVDAdapted(base, snapshot.factors, snapshot.means, report["n_fraction"], seed=report["seed"])
    model.load_lambdas(lambdas, source=LAMBDA_FILE)
    return model


def _metadata(report: Mapping[str, Any]) -> dict[str, str]:
    return {"basis_version": str(report["basis_version"]), "n_fraction": repr(report["n_fraction"]),
            "target": str(report.get("target", ""))}


def write_adapted(base: nn.Module, snapshot: Snapshot, report: Mapping[str, Any], lambdas: Mapping[str, Tensor],
                  out: Path, text: str, base_folder: Path | None = None) -> Path:
    """Write ``base`` adapted by ``snapshot`` and ``lambdas`` (consumes ``base``) crash-safely to ``out``, with
    the model card ``text``; with ``base_folder`` (a transformers base's), ``out`` is a new Hugging Face folder."""
    out = Path(out)
    if base_folder is None and out.suffix != ".safetensors":
        raise AdaptError(f"{out}: the export must end in .safetensors (open_clip picks its loader by suffix)")
    if not out.parent.is_dir():
        raise AdaptError(f"{out}: folder {out.parent} does not exist")
    state = _adapted(base, snapshot, report, lambdas).merged_state_dict()
    if base_folder is not None:
        return write_hf_folder(state, base_folder, out, _metadata(report), text)
    return write_file(state, out, {"format": "pt", **_metadata(report)}, text)


def write_job_adapter(base: nn.Module, snapshot: Snapshot, report: Mapping[str, Any],
                      lambdas: Mapping[str, Tensor], out: Path, base_model: str,
                      text: Callable[[Mapping[str, Any]], str]) -> lora.AdapterPlan:
    """The job's change over the base as a LoRA adapter folder ``out`` (consumes ``base``): per matrix
    the trained top-N and the frozen rest, the basis's means as ``store.adapter`` carries them."""
    model = _adapted(base, snapshot, report, lambdas)
    factors = model.delta_factors(snapshot.factors)
    full = model.merged_state_dict()
    return lora.write_adapter(model.base, full, factors, snapshot.means, out, base_model=base_model,
                         card=lambda plan: text(plan.summary()), metadata=_metadata(report))
