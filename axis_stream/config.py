"""Configuration: a dataclass tree loaded from TOML and validated here, and nowhere else.

Every setting has a default; ``config/axis-stream.toml`` documents each one. Unknown keys and
values of the wrong type or range are ``ConfigError``s that name the key. Paths can be overridden
from the environment (``AXIS_STREAM_STATE_DIR``, ``AXIS_STREAM_WATCH_DIR``, ``AXIS_STREAM_DATA_ROOT``).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on Python 3.10
    import tomli as tomllib

from axis_stream.errors import ConfigError

VIT_BLOCK_MATRICES = [
    "visual.transformer.resblocks.*.attn.in_proj_weight",
    "visual.transformer.resblocks.*.attn.out_proj.weight",
    "visual.transformer.resblocks.*.mlp.c_fc.weight",
    "visual.transformer.resblocks.*.mlp.c_proj.weight",
]

HF_FAMILY_MATRICES = {
    "clip": [f"vision_model.encoder.layers.*.{m}.weight" for m in
             ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")],
    "llama": [f"{prefix}layers.*.{m}.weight" for prefix in ("", "model.") for m in
              ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")],
    "bert": [f"*encoder.layer.*.{m}.weight" for m in
             ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
              "intermediate.dense", "output.dense")],
}
"""The paper's matrices (attention and MLP projections of the transformer blocks) in Hugging Face names,
per architecture family: CLIP's vision tower (``CLIPModel``, ``CLIPVisionModel``), Llama/Qwen/Mistral-style
LMs (bare or ``model.``-prefixed for ``*ForCausalLM``), BERT-style encoders (bare or ``bert.``-prefixed).
Each family's patterns match nothing in the others' models (CLIP's text tower included), so their
union is the default for ``[base] kind = "transformers"`` whatever the family."""

HF_BLOCK_MATRICES = [p for patterns in HF_FAMILY_MATRICES.values() for p in patterns]
BASE_KINDS = ("open_clip", "transformers")
CALIBRATIONS = ("none", "spectral", "norm", "interference")
"""``[basis] calibration``: the names of ``core.calibration.CALIBRATIONS`` (a test keeps the two equal)."""
FOLD_STRATEGIES = ("axis", "opcm", "continual-ta", "continual-ties", "running-average")
"""``[basis] strategy``: the names of ``core.strategies.FOLD_STRATEGIES`` (config imports no core module;
a test keeps the two equal). The strategy's parameters are checked by that registry when a basis opens."""


@dataclass
class PathsConfig:
    state_dir: Path = Path("/var/lib/axis-stream")
    watch_dir: Path = Path("/srv/axis-stream/incoming")
    archive_dir: Path | None = None      # default: <state_dir>/archive
    quarantine_dir: Path | None = None   # default: <state_dir>/quarantine
    data_root: Path | None = None        # datasets for Stage 2
    log_file: Path | None = None         # also append log lines here (stderr/the journal always gets them)

    @property
    def basis_dir(self) -> Path:
        return self.state_dir / "basis"

    @property
    def archive(self) -> Path:
        return self.archive_dir or self.state_dir / "archive"

    @property
    def quarantine(self) -> Path:
        return self.quarantine_dir or self.state_dir / "quarantine"

    @property
    def socket(self) -> Path:
        return self.state_dir / "control.sock"

    @property
    def jobs_dir(self) -> Path:
        return self.state_dir / "jobs"


@dataclass
class BaseConfig:
    kind: str = "open_clip"              # open_clip | transformers (a Hugging Face model folder)
    model: str = "ViT-B-32"              # open_clip architecture name; transformers: a folder or a model id
    pretrained: str = "openai"           # open_clip pretrained tag, or a local weights file (open_clip only)
    model_config: Path | None = None     # optional open_clip model config JSON (custom architectures)
    hf_cache: Path | None = None         # transformers: the hub cache a model id is looked up in (never downloaded)

    def validate(self) -> None:
        _choice("base.kind", self.kind, BASE_KINDS)
        if not self.model:
            raise ConfigError("base.model: required")


@dataclass
class BasisConfig:
    matrix_patterns: list[str] = field(default_factory=lambda: list(VIT_BLOCK_MATRICES))
    conv_as_matrix: bool = False         # treat 4-D conv weights as (out, in*kh*kw) matrices
    k_mode: str = "fraction"             # fraction | count | gavish-donoho
    k_fraction: float = 0.10
    k_count: int = 76
    svd: str = "randomized"              # exact | randomized (certified, falls back to exact)
    svd_tol: float = 1e-4
    fold_device: str = "cpu"             # where matrix folds run: cpu, cuda or cuda:N (results stored on the CPU)
    keep_versions: int = 5
    trust_pickles: bool = False          # allow whole-model pickles in the watched folder
    allow_other_architectures: bool = False  # fold a model folder of another head (architectures), warned
    strategy: str = "axis"               # how a source is folded: one of FOLD_STRATEGIES
    strategy_params: dict[str, float] = field(default_factory=dict)  # the strategy's (alpha, lam, density)
    calibration: str = "spectral"        # axis: the merged basis's per-matrix factor, one of CALIBRATIONS

    def validate(self) -> None:
        _choice("basis.strategy", self.strategy, FOLD_STRATEGIES)
        _choice("basis.calibration", self.calibration, CALIBRATIONS)
        for name, value in self.strategy_params.items():
            if not math.isfinite(value):
                raise ConfigError(f"basis.strategy_params.{name}: must be a finite number, got {value!r}")
        if self.strategy != "axis" and self.k_mode == "gavish-donoho":
            raise ConfigError(f"basis.k_mode: 'gavish-donoho' sets K per fold from AXIS's factors; "
                              f"strategy {self.strategy!r} needs 'fraction' or 'count'")
        _choice("basis.k_mode", self.k_mode, ("fraction", "count", "gavish-donoho"))
        _choice("basis.svd", self.svd, ("exact", "randomized"))
        if not isinstance(self.fold_device, str) or not re.fullmatch(r"cpu|cuda(:\d+)?", self.fold_device):
            raise ConfigError(f"basis.fold_device: must be cpu, cuda or cuda:N, got {self.fold_device!r}")
        _range("basis.k_fraction", self.k_fraction, 0.0, 1.0, low_open=True)
        _range("basis.k_count", self.k_count, 1, None)
        _range("basis.svd_tol", self.svd_tol, 0.0, None, low_open=True)
        _range("basis.keep_versions", self.keep_versions, 1, None)
        if not self.matrix_patterns:
            raise ConfigError("basis.matrix_patterns: must name at least one pattern")


@dataclass
class WatchConfig:
    observer: str = "auto"               # auto | inotify | polling
    poll_interval_s: float = 1.0         # polling observer interval
    stable_interval_s: float = 2.0       # size and mtime unchanged this long = complete
    rescan_interval_s: float = 60.0      # periodic full rescan (inotify overflow, network filesystems)
    discard: str = "delete"              # delete | archive
    incomplete_timeout_s: float = 600.0  # a short file / incomplete folder waits this long unchanged, then quarantine
    fold_workers: int = 0                # threads folding a checkpoint's matrices; 0: the cores this process may use

    def validate(self) -> None:
        _choice("watch.observer", self.observer, ("auto", "inotify", "polling"))
        _range("watch.fold_workers", self.fold_workers, 0, None)
        _choice("watch.discard", self.discard, ("delete", "archive"))
        for name in ("poll_interval_s", "stable_interval_s", "rescan_interval_s", "incomplete_timeout_s"):
            _range(f"watch.{name}", getattr(self, name), 0.0, None, low_open=True)


@dataclass
class TriggerConfig:
    target: str = ""
    cron: str = ""                       # crontab expression, e.g. "0 3 * * *"
    every_folds: int = 0                 # queue after every M folds (0 = off)

    def validate(self) -> None:
        if not self.target:
            raise ConfigError("scheduler.triggers.target: required")
        if bool(self.cron) == bool(self.every_folds):
            raise ConfigError("scheduler.triggers: give exactly one of cron or every_folds")
        _range("scheduler.triggers.every_folds", self.every_folds, 0, None)


@dataclass
class RayConfig:
    address: str = "auto"                # the cluster to join: "auto", "host:6379" or "ray://host:10001"
    num_gpus: float = 1.0                # GPUs each task requests
    num_cpus: float = 1.0                # CPUs each task requests
    max_retries: int = 0                 # re-runs of a task whose worker or node was lost
    ship_basis: bool = False             # send the pinned basis version through the object store

    def validate(self, prefix: str) -> None:
        if not self.address:
            raise ConfigError(f"{prefix}.address: required (\"auto\", host:port or ray://host:port)")
        _range(f"{prefix}.num_gpus", self.num_gpus, 0.0, None)
        _range(f"{prefix}.num_cpus", self.num_cpus, 0.0, None)
        _range(f"{prefix}.max_retries", self.max_retries, 0, None)


EXECUTORS = ("local", "ray")


@dataclass
class SchedulerConfig:
    gpu_slots: int = 1                   # adaptation jobs running at once
    executor: str = "local"              # local child processes | ray tasks on a Ray cluster
    ray: RayConfig = field(default_factory=RayConfig)
    triggers: list[TriggerConfig] = field(default_factory=list)
    max_queued_jobs: int = 100           # a submit beyond this many queued jobs is refused

    def validate(self) -> None:
        _range("scheduler.gpu_slots", self.gpu_slots, 1, None)
        _range("scheduler.max_queued_jobs", self.max_queued_jobs, 1, None)
        _choice("scheduler.executor", self.executor, EXECUTORS)
        self.ray.validate("scheduler.ray")
        for t in self.triggers:
            t.validate()


def _setting(default: Any, help: str) -> Any:
    """A field with its one-line help: the config file's documentation, the CLI option's help."""
    return field(default=default, metadata={"help": help})


@dataclass
class AdaptConfig:
    """Stage 2's settings: ``[adapt]`` in the config, and each one an ``adapt`` option and a job
    parameter of the same name (``cli.adapt`` and ``adapt.recipe.job_settings`` derive them from here)."""

    n_fraction: float = _setting(0.10, "Trained top-N singular values per matrix, fraction of min(m, n).")
    start_scale: float | str = _setting("auto", "Start Lambda at this times the merged singular values (1.0: the "
                                        "paper's merged start), or auto: the best of a few starts on validation.")
    epochs: int = _setting(10, "Training epochs.")
    lr: float = _setting(1e-1, "Learning rate (AdamW).")
    weight_decay: float = _setting(0.1, "AdamW weight decay.")
    batch_size: int = _setting(64, "Batch size.")
    grad_clip: float = _setting(1.0, "Gradient norm clipping.")
    val_fraction: float = _setting(0.10, "Fraction of the training split held out for validation.")
    val_max: int = _setting(5000, "At most this many validation samples.")
    seed: int = _setting(0, "Random seed.")
    num_workers: int = _setting(2, "Data loader worker processes.")
    device: str = _setting("auto", "auto (CUDA when present, else CPU), cpu, cuda or cuda:N.")
    amp: bool = _setting(True, "Mixed precision on CUDA.")

    def validate(self) -> None:
        _range("adapt.n_fraction", self.n_fraction, 0.0, 1.0, low_open=True)
        scale = self.start_scale
        if scale != "auto" and (isinstance(scale, (bool, str)) or not math.isfinite(scale) or scale < 0):
            raise ConfigError(f"adapt.start_scale: must be a finite number >= 0 or \"auto\" (the trainable singular "
                              f"values start at start_scale * s; 1.0 is the paper's merged start; auto scores a "
                              f"few starts on validation), got {scale!r}")
        _range("adapt.epochs", self.epochs, 1, None)
        _range("adapt.lr", self.lr, 0.0, None, low_open=True)
        _range("adapt.weight_decay", self.weight_decay, 0.0, None)
        _range("adapt.batch_size", self.batch_size, 1, None)
        _range("adapt.val_fraction", self.val_fraction, 0.0, 1.0, low_open=True)
        _range("adapt.val_max", self.val_max, 1, None)
        _range("adapt.num_workers", self.num_workers, 0, None)


@dataclass
class MetricsConfig:
    address: str = "127.0.0.1:9464"      # host:port for /metrics, /healthz, /readyz; "" disables

    def validate(self) -> None:
        if self.address:
            host, _, port = self.address.rpartition(":")
            if not host or not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
                raise ConfigError(f"metrics.address: expected host:port, got {self.address!r}")


@dataclass
class LogConfig:
    level: str = "INFO"

    def validate(self) -> None:
        _choice("log.level", self.level.upper(), ("DEBUG", "INFO", "WARNING", "ERROR"))


@dataclass
class Config:
    paths: PathsConfig = field(default_factory=PathsConfig)
    base: BaseConfig = field(default_factory=BaseConfig)
    basis: BasisConfig = field(default_factory=BasisConfig)
    watch: WatchConfig = field(default_factory=WatchConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    adapt: AdaptConfig = field(default_factory=AdaptConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def validate(self) -> Config:
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            if hasattr(section, "validate"):
                section.validate()
        return self


HF_CACHE_ENV = ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE")


def default_hf_cache(env: Mapping[str, str]) -> Path:
    """Where huggingface_hub keeps downloaded models: ``$HF_HUB_CACHE``, ``$HF_HOME/hub`` or ~/.cache/huggingface/hub."""
    for var in HF_CACHE_ENV:
        if env.get(var):
            return Path(env[var]).expanduser()
    home = env.get("HF_HOME") or str(Path(env.get("XDG_CACHE_HOME") or "~/.cache") / "huggingface")
    return Path(home).expanduser() / "hub"


ENV_OVERRIDES = {
    "AXIS_STREAM_STATE_DIR": "state_dir",
    "AXIS_STREAM_WATCH_DIR": "watch_dir",
    "AXIS_STREAM_DATA_ROOT": "data_root",
}


def load(path: str | Path | None = None, env: dict[str, str] | None = None) -> Config:
    """Read ``path`` (or only defaults when None), apply environment overrides, validate."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read config: {exc.strerror}") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: invalid TOML: {exc}") from None
        except RecursionError:
            raise ConfigError(f"{path}: invalid TOML: arrays or tables nested too deeply") from None
    cfg = build_dataclass(Config, data, "")
    base_dir = Path(path).resolve().parent if path is not None else Path.cwd()
    environ: Mapping[str, str] = os.environ if env is None else env
    for var, name in ENV_OVERRIDES.items():
        value = environ.get(var)
        if value:
            setattr(cfg.paths, name, Path(value))
    for f in dataclasses.fields(cfg.paths):
        value = getattr(cfg.paths, f.name)
        if isinstance(value, Path) and not value.is_absolute():
            setattr(cfg.paths, f.name, base_dir / value)
    if cfg.base.model_config is not None and not cfg.base.model_config.is_absolute():
        cfg.base.model_config = base_dir / cfg.base.model_config
    if cfg.base.kind == "transformers":
        if cfg.basis.matrix_patterns == VIT_BLOCK_MATRICES:  # open_clip's names, which no HF model has
            cfg.basis.matrix_patterns = list(HF_BLOCK_MATRICES)
        if cfg.base.hf_cache is None:
            cfg.base.hf_cache = default_hf_cache(environ)
        elif not cfg.base.hf_cache.is_absolute():
            cfg.base.hf_cache = base_dir / cfg.base.hf_cache
        local = Path(cfg.base.model).expanduser()
        if not local.is_absolute() and (base_dir / local).is_dir():
            cfg.base.model = str(base_dir / local)
    return cfg.validate()


def build_dataclass(cls: type, data: Any, prefix: str) -> Any:
    """Construct dataclass ``cls`` from a TOML table, rejecting unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a table")
    hints = get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in known:
            raise ConfigError(f"{prefix}{key}: unknown key")
    kwargs = {key: convert_value(hints[key], value, f"{prefix}{key}") for key, value in data.items()}
    return cls(**kwargs)


def convert_value(hint: Any, value: Any, key: str) -> Any:
    """Check one TOML value against the type hint ``hint`` and convert it (paths, ints as floats)."""
    origin = getattr(hint, "__origin__", None)
    args: tuple[Any, ...] = getattr(hint, "__args__", ())
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return build_dataclass(hint, value, key + ".")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__}")
        return [convert_value(args[0], v, key) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a table, got {type(value).__name__}")
        return {k: convert_value(args[1], v, f"{key}.{k}") for k, v in value.items()}
    if type(None) in args:  # Optional[X]
        inner = next(a for a in args if a is not type(None))
        return None if value in ("", None) else convert_value(inner, value, key)
    if isinstance(hint, types.UnionType) and set(args) <= {bool, int, float, str}:  # e.g. float | str
        if float in args and type(value) is int:
            return float(value)
        if type(value) not in args:
            raise ConfigError(f"{key}: expected {' or '.join(a.__name__ for a in args)}, "
                              f"got {type(value).__name__} {value!r}")
        return value
    if hint is Path:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a path string, got {type(value).__name__}")
        return Path(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (bool, int, float, str) and (type(value) is not hint):
        raise ConfigError(f"{key}: expected {hint.__name__}, got {type(value).__name__} {value!r}")
    return value


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(allowed)}")


def _range(key: str, value: float, low: float, high: float | None, low_open: bool = False) -> None:
    if not math.isfinite(value):          # nan passes every comparison; inf would make a wait endless
        raise ConfigError(f"{key}: must be a finite number, got {value!r}")
    if value < low or (low_open and value == low) or (high is not None and value > high):
        bound = f"{'>' if low_open else '>='} {low}" + (f" and <= {high}" if high is not None else "")
        raise ConfigError(f"{key}: must be {bound}, got {value!r}")
