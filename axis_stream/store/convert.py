"""``axis-stream convert``: the public task-vector releases (whole pickled objects) to safetensors.

Input (task_vectors and aTLAS releases, saved with torch 1.13 and open_clip 2.10)::

    SRC/<MODEL>/<Dataset>Val/finetuned.pt     a pickled src.modeling.ImageEncoder (.model: open_clip CLIP)
    SRC/<MODEL>/<Dataset>Val/zeroshot.pt      the same for the pretrained model
    SRC/<MODEL>/head_<Dataset>Val.pt          a pickled src.modeling.ClassificationHead

Output in OUT: ``<Dataset>.safetensors`` (the open_clip state dict; metadata: dataset, source,
source_sha256, base_sha256, kind), ``head_<Dataset>.safetensors`` (weight, bias) and one
``zeroshot.safetensors``. Each checkpoint is validated against the configured base exactly as a
fold would validate it before it is renamed into place. Only the ``<Dataset>.safetensors`` files
belong in the watched folder.

The pickles are read by ``unpickle`` (stand-ins for ``src.modeling``, trusted packages only). It
stops accidents, it is not a sandbox: convert only files whose origin you trust.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import save_file
from torch import Tensor

from axis_stream import __version__, errors
from axis_stream.config import Config
from axis_stream.core import layout
from axis_stream.store import atomic, ingest, models, readers, unpickle

DATASET_SUFFIX = "Val"


@dataclass(frozen=True)
class Converted:
    """One file of the release: where it went, or why not."""

    source: Path
    output: Path | None
    kind: str                       # finetuned | zeroshot | head
    dataset: str
    note: str                       # what validation found, or the error
    ok: bool = True

    def line(self) -> str:
        target = self.output.name if self.output else "not converted"
        return f"{'ok ' if self.ok else 'ERR'} {self.kind:<9} {self.dataset:<14} {self.source} -> {target}: {self.note}"


def convert_tree(src: str | Path, out: str | Path, base_state_dict: Mapping[str, Tensor], *,
                 model: str, required: Iterable[str] = ()) -> list[Converted]:
    """Convert ``src/<model>`` (or ``src`` itself when it holds the ``*Val`` folders) into ``out``.

    A file that fails validation is reported (``ok=False``) and not written; the others go on.
    """
    src, out = Path(src), Path(out)
    root = _model_root(src, model)
    out.mkdir(parents=True, exist_ok=True)
    base_sha = models.weights_sha256(base_state_dict)
    required = list(required)
    results: list[Converted] = []
    zeroshot_done = False
    for ddir in sorted(p for p in root.iterdir() if p.is_dir() and p.name.endswith(DATASET_SUFFIX)):
        dataset = ddir.name[:-len(DATASET_SUFFIX)]
        if (ddir / "finetuned.pt").is_file():
            results.append(_convert_one(ddir / "finetuned.pt", out / f"{dataset}.safetensors", src,
                                        dataset, "finetuned", base_state_dict, base_sha, required))
        if (ddir / "zeroshot.pt").is_file() and not zeroshot_done:
            results.append(_convert_one(ddir / "zeroshot.pt", out / "zeroshot.safetensors", src,
                                        dataset, "zeroshot", base_state_dict, base_sha, required))
            zeroshot_done = results[-1].ok
    for head in sorted(root.glob(f"head_*{DATASET_SUFFIX}.pt")):
        dataset = head.stem[len("head_"):-len(DATASET_SUFFIX)]
        results.append(_convert_one(head, out / f"head_{dataset}.safetensors", src, dataset, "head",
                                    base_state_dict, base_sha, required))
    return results


def convert_from_config(cfg: Config, src: str | Path, out: str | Path) -> list[Converted]:
    """``axis-stream convert``: the configured base model's releases, validated against it."""
    base, _ = models.load_base(cfg)
    required = layout.matrix_names(base, cfg.basis.matrix_patterns, cfg.basis.conv_as_matrix)
    return convert_tree(src, out, base, model=cfg.base.model, required=required)


def _model_root(src: Path, model: str) -> Path:
    if (src / model).is_dir():
        return src / model
    if any(src.glob(f"*{DATASET_SUFFIX}/finetuned.pt")):
        return src
    have = sorted(p.name for p in src.iterdir() if p.is_dir()) if src.is_dir() else []
    raise errors.AxisError(f"{src}: no {model}/ folder and no *{DATASET_SUFFIX}/finetuned.pt inside "
                           f"(folders: {', '.join(have) or 'none'})")


def _convert_one(path: Path, output: Path, src: Path, dataset: str, kind: str,
                 base: Mapping[str, Tensor], base_sha: str, required: list[str]) -> Converted:
    """Unpickle, validate as a fold would, write as safetensors (crash-safe)."""
    rel = path.relative_to(src)
    try:
        readers.torch_file_kind(path)
        tensors = readers.unnest_state_dict(path, unpickle.state_dict_of(unpickle.load_pickle(path)))
        tensors = {k: v.contiguous().clone() for k, v in tensors.items()}
        note = f"{len(tensors)} tensors" if kind == "head" else _validate(path, tensors, base, base_sha,
                                                                             required, kind)
    except errors.CheckpointError as exc:
        return Converted(rel, None, kind, dataset, f"{exc.message} ({exc.reason})", ok=False)
    metadata = {"dataset": dataset, "source": str(rel), "kind": kind, "source_sha256": readers.file_sha256(path),
                "base_sha256": base_sha, "converted_by": f"axis-stream {__version__}"}
    atomic.atomic_write(output, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    return Converted(rel, output, kind, dataset, note)


def _validate(path: Path, tensors: Mapping[str, Tensor], base: Mapping[str, Tensor], base_sha: str,
              required: list[str], kind: str) -> str:
    """A fold's validation; a zeroshot model is expected to be the base itself."""
    try:
        ckpt = ingest.validate_state_dict(path, tensors, base, required=required, base_sha256=base_sha)
    except errors.ZeroDelta:
        if kind == "zeroshot":
            return "identical to the configured base"
        raise
    if kind == "zeroshot":
        return f"differs from the configured base by {ckpt.relative_norm:.2g} of its norm; check the config"
    return f"|tau|/|base| {ckpt.relative_norm:.3f}; {ckpt.mapping}"
