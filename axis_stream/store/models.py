"""The base model: building it (open_clip, or a Hugging Face transformers folder), and fingerprinting its weights.

A transformers base is a local folder or a model id looked up in the local Hugging Face hub cache
(``models--ORG--NAME/snapshots/<refs/main>``); nothing is downloaded. Stage 1 needs only its
weights, read with ``readers.read_hf_base`` (no ``transformers`` import); building the module
(``create_base``) needs the ``hf`` extra.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from axis_stream.config import BaseConfig, Config
from axis_stream.errors import ConfigError
from axis_stream.store import readers

if TYPE_CHECKING:     # imported where a transformers base is built, not by every reader of the store
    import transformers

TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
"""A CLIP small enough to fine-tune on a CPU in seconds, for the quickstart and the tests."""


def register_model_config(path: str | Path) -> str:
    """Make an open_clip model config JSON available under its file stem; returns that name."""
    import open_clip

    path = Path(path)
    json.loads(path.read_text())  # a clear JSON error before open_clip's
    open_clip.add_model_config(path)
    return path.stem


def hf_model_dir(cfg: BaseConfig) -> Path:
    """The folder of a transformers base: ``cfg.model`` as a folder, else as a model id in the hub cache."""
    folder = Path(cfg.model).expanduser()
    if folder.is_dir():
        return folder
    repo = Path(cfg.hf_cache or "") / f"models--{cfg.model.replace('/', '--')}"
    ref = repo / "refs" / "main"
    snapshots = sorted(p for p in (repo / "snapshots").glob("*") if p.is_dir())
    if ref.is_file() and (repo / "snapshots" / ref.read_text().strip()).is_dir():
        return repo / "snapshots" / ref.read_text().strip()
    if len(snapshots) == 1:
        return snapshots[0]
    several = ", which has several snapshots and no refs/main" if snapshots else ""
    raise ConfigError(f"base.model: {cfg.model!r} is neither a folder nor a model in the Hugging Face cache "
                      f"(looked in {folder.resolve()} and {repo}{several}); "
                      f"download it first (huggingface-cli download {cfg.model}) or give its folder")


def create_base(cfg: BaseConfig, device: str | torch.device = "cpu") -> nn.Module:
    """Build the configured model with its pretrained weights: open_clip (a tag or a local file), or the
    transformers class its config.json names (``AutoModel`` when it names none)."""
    if cfg.kind == "transformers":
        import transformers

        folder = hf_model_dir(cfg)
        archs = readers.hf_config(folder).get("architectures") or ["AutoModel"]
        cls = getattr(transformers, archs[0], transformers.AutoModel)
        if isinstance(cls, type) and issubclass(cls, transformers.CLIPModel):
            return _clip_for_stage2().from_pretrained(folder, local_files_only=True).to(device)  # type: ignore[arg-type]  # HF
        return cls.from_pretrained(folder, local_files_only=True).to(device)
    import open_clip

    if cfg.model_config is not None:
        register_model_config(cfg.model_config)
    with quiet_open_clip(random_init=not cfg.pretrained):
        return open_clip.create_model(cfg.model, pretrained=cfg.pretrained or None, device=device)


class _OpenClipSteps(logging.Filter):
    """Drops open_clip's step-by-step INFO records, and with ``random_init`` its warning that no weights
    were loaded (the config asked for a random init: ``base.pretrained = ""``)."""

    def __init__(self, random_init: bool):
        super().__init__()
        import open_clip

        self.folder, self.random_init = str(Path(open_clip.__file__).parent), random_init

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.pathname.startswith(self.folder):
            return True
        return record.levelno >= logging.WARNING and not (
            self.random_init and str(record.msg).startswith("No pretrained weights loaded"))


@contextlib.contextmanager
def quiet_open_clip(random_init: bool = False) -> Iterator[None]:
    """Around one of our open_clip calls: its INFO lines (``Parsing model identifier ...``, logged on the
    root logger) and a warning about what we asked for are dropped, while its other warnings still show.
    Only the root logger's records from open_clip's files, only during the call; and since open_clip logs
    through ``logging.info``, which configures a root logger without handlers (``basicConfig``), a
    stand-in for Python's last-resort handler sits there meanwhile so that nothing is configured for good."""
    root, steps = logging.getLogger(), _OpenClipSteps(random_init)
    stand_in = logging.lastResort if not root.handlers and logging.lastResort is not None else None
    root.addFilter(steps)
    if stand_in is not None:
        root.addHandler(stand_in)
    try:
        yield
    finally:
        root.removeFilter(steps)
        if stand_in is not None:
            root.removeHandler(stand_in)


OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@functools.cache
def _clip_for_stage2() -> type[transformers.CLIPModel]:
    """transformers' ``CLIPModel`` with the surface Stage 2 uses on an open_clip model: ``encode_image``,
    ``encode_text`` (the projected features) and ``preprocess_cfg`` (read by open_clip's transforms).
    Same modules, so the same state-dict names as the folder's."""
    import transformers

    class CLIPForStage2(transformers.CLIPModel):
        @classmethod
        def from_pretrained(cls, folder: Path, **kwargs: Any) -> CLIPForStage2:  # type: ignore[override]  # folder only
            model = super().from_pretrained(folder, **kwargs)
            size = model.config.vision_config.image_size  # type: ignore[union-attr]  # HF: a CLIPVisionConfig here
            try:
                proc = json.loads((Path(folder) / "preprocessor_config.json").read_text())
            except FileNotFoundError:
                proc = {}
            preprocess = {"size": size, "mode": "RGB", "interpolation": "bicubic",
                          "resize_mode": "shortest", "fill_color": 0,
                          "mean": tuple(proc.get("image_mean", OPENAI_CLIP_MEAN)),
                          "std": tuple(proc.get("image_std", OPENAI_CLIP_STD))}
            model.preprocess_cfg = preprocess  # type: ignore[assignment]  # torch: attributes Tensor | Module
            return model

        def encode_image(self, image: Tensor) -> Tensor:
            return _features(self.get_image_features(pixel_values=image))

        def encode_text(self, text: Tensor) -> Tensor:
            return _features(self.get_text_features(input_ids=text))

    return CLIPForStage2


def _features(out: Any) -> Tensor:
    """transformers 4 returns the projected features; 5 returns them as ``pooler_output``."""
    return out if isinstance(out, Tensor) else out.pooler_output


def tokenizer_for(cfg: BaseConfig) -> Callable[[list[str]], Tensor]:
    """Texts -> token ids for the base's text tower: open_clip's tokenizer, or the transformers folder's
    own (padded to its text tower's context length)."""
    if cfg.kind != "transformers":
        import open_clip

        with quiet_open_clip():
            return open_clip.get_tokenizer(cfg.model)
    import transformers

    folder = hf_model_dir(cfg)
    tok = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    text_cfg = readers.hf_config(folder).get("text_config", {})
    length = int(text_cfg.get("max_position_embeddings", tok.model_max_length))
    return lambda texts: tok(list(texts), padding="max_length", truncation=True, max_length=length,
                             return_tensors="pt")["input_ids"]


def weights_sha256(state_dict: Mapping[str, Tensor]) -> str:
    """Fingerprint of a state dict: names, dtypes, shapes and bytes, in sorted name order."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def load_base(cfg: Config) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The configured base model's state dict and its identity (name, pretrained; sha256 added on create).
    A transformers base's state dict is what its folder stores (a ``readers.BaseWeights`` with its config)."""
    if cfg.base.kind == "transformers":
        hf = readers.read_hf_base(hf_model_dir(cfg.base))
        return hf, {"name": cfg.base.model, "pretrained": f"transformers:{(hf.config or {}).get('model_type', '')}"}
    model = create_base(cfg.base)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    return state, {"name": cfg.base.model, "pretrained": cfg.base.pretrained}
