"""Config loading: the shipped file documents every setting, errors name the key, env overrides paths."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import get_type_hints

import pytest

from axis_stream import config
from axis_stream.errors import ConfigError

SHIPPED = Path(__file__).resolve().parents[1] / "config" / "axis-stream.toml"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "axis-stream.toml"
    path.write_text(text)
    return path


def leaf_keys(cls: type, prefix: str = "") -> list[str]:
    """Dotted names of every setting in the dataclass tree."""
    out = []
    for name, hint in get_type_hints(cls).items():
        out += leaf_keys(hint, f"{prefix}{name}.") if dataclasses.is_dataclass(hint) else [prefix + name]
    return out


def test_shipped_file_is_exactly_the_defaults():
    assert config.load(SHIPPED, env={}) == config.Config().validate()


def test_shipped_file_documents_every_setting():
    text = SHIPPED.read_text()
    keys = leaf_keys(config.Config) + [f"scheduler.triggers.{f.name}"
                                      for f in dataclasses.fields(config.TriggerConfig)]
    assert "paths.state_dir" in keys and "log.level" in keys and "watch.stable_interval_s" in keys
    for key in keys:
        if key == "scheduler.triggers":
            assert "[[scheduler.triggers]]" in text
            continue
        *_, name = key.split(".")
        # each appears as "name = ..." (a trigger's fields in the commented example), with a comment
        assert re.search(rf"^#?\s*{re.escape(name)} = ", text, re.M), f"{key} is not documented"


def test_no_file_gives_defaults():
    cfg = config.load(None, env={})
    assert cfg.watch.stable_interval_s == 2.0 and cfg.metrics.address == "127.0.0.1:9464"
    assert cfg.paths.quarantine == Path("/var/lib/axis-stream/quarantine")


@pytest.mark.parametrize("text, key", [
    ("[watch]\nstable_intervall_s = 1.0\n", "watch.stable_intervall_s"),
    ("[wacth]\nobserver = 'auto'\n", "wacth"),
    ("[[scheduler.triggers]]\ntarget = 'x'\nevery_folds = 2\ncorn = '* * * * *'\n", "scheduler.triggers.corn"),
])
def test_unknown_keys_are_errors_that_name_the_key(tmp_path, text, key):
    with pytest.raises(ConfigError, match=re.escape(f"{key}: unknown key")):
        config.load(write(tmp_path, text), env={})


@pytest.mark.parametrize("text, key", [
    ("[watch]\nobserver = 'fanotify'\n", "watch.observer"),
    ("[watch]\ndiscard = 'shred'\n", "watch.discard"),
    ("[watch]\nstable_interval_s = 0\n", "watch.stable_interval_s"),
    ("[watch]\nfold_workers = -1\n", "watch.fold_workers"),
    ("[watch]\nincomplete_timeout_s = -1\n", "watch.incomplete_timeout_s"),
    ("[watch]\npoll_interval_s = '1s'\n", "watch.poll_interval_s"),
    ("[basis]\nk_fraction = 1.5\n", "basis.k_fraction"),
    ("[basis]\nkeep_versions = 0\n", "basis.keep_versions"),
    ("[basis]\nsvd = 'magic'\n", "basis.svd"),
    ("[basis]\nmatrix_patterns = 'visual.*'\n", "basis.matrix_patterns"),
    ("[basis]\ntrust_pickles = 'yes'\n", "basis.trust_pickles"),
    ("[basis]\nstrategy = 'opcn'\n", "basis.strategy"),
    ("[basis]\nstrategy_params = 0.5\n", "basis.strategy_params"),
    ("[basis.strategy_params]\nalpha = 'half'\n", "basis.strategy_params.alpha"),
    ("[basis.strategy_params]\nalpha = nan\n", "basis.strategy_params.alpha"),
    ("[basis]\nstrategy = 'opcm'\nk_mode = 'gavish-donoho'\n", "basis.k_mode"),
    ("[scheduler]\ngpu_slots = 0\n", "scheduler.gpu_slots"),
    ("[[scheduler.triggers]]\ntarget = 'x'\n", "scheduler.triggers"),
    ("[[scheduler.triggers]]\ncron = '0 3 * * *'\n", "scheduler.triggers.target"),
    ("[metrics]\naddress = '9464'\n", "metrics.address"),
    ("[metrics]\naddress = 'localhost:99999'\n", "metrics.address"),
    ("[log]\nlevel = 'LOUD'\n", "log.level"),
    ("[adapt]\nstart_scale = -0.3\n", "adapt.start_scale"),
    ("[adapt]\nstart_scale = nan\n", "adapt.start_scale"),
    ("[adapt]\nstart_scale = '0.3'\n", "adapt.start_scale"),
    ("[paths]\nstate_dir = 3\n", "paths.state_dir"),
    ("paths = 3\n", "paths"),
])
def test_bad_values_are_errors_that_name_the_key(tmp_path, text, key):
    with pytest.raises(ConfigError) as info:
        config.load(write(tmp_path, text), env={})
    assert str(info.value).startswith(key), str(info.value)


def test_a_strategy_and_its_parameters_load_and_a_wrong_name_lists_the_choices(tmp_path):
    cfg = config.load(write(tmp_path, "[basis]\nstrategy = 'opcm'\n[basis.strategy_params]\nalpha = 1\n"), env={})
    assert (cfg.basis.strategy, cfg.basis.strategy_params) == ("opcm", {"alpha": 1.0})
    with pytest.raises(ConfigError) as info:
        config.load(write(tmp_path, "[basis]\nstrategy = 'tsvm'\n"), env={})
    assert str(info.value) == ("basis.strategy: 'tsvm' is not one of axis, opcm, continual-ta, continual-ties, "
                               "running-average")


def test_invalid_toml_and_missing_file_name_the_file(tmp_path):
    bad = write(tmp_path, "[watch\n")
    with pytest.raises(ConfigError, match="axis-stream.toml: invalid TOML"):
        config.load(bad, env={})
    with pytest.raises(ConfigError, match="nope.toml: cannot read config"):
        config.load(tmp_path / "nope.toml", env={})


def test_relative_paths_resolve_against_the_config_folder(tmp_path):
    cfg = config.load(write(tmp_path, "[paths]\nstate_dir = 'state'\nwatch_dir = '../in'\n"), env={})
    assert cfg.paths.state_dir == tmp_path / "state"
    assert cfg.paths.watch_dir == tmp_path / ".." / "in"
    assert cfg.paths.archive == tmp_path / "state" / "archive"
    assert cfg.paths.socket == tmp_path / "state" / "control.sock"
    assert cfg.paths.log_file is None


def test_environment_overrides_paths(tmp_path):
    path = write(tmp_path, "[paths]\nstate_dir = 'state'\nwatch_dir = 'in'\n")
    env = {"AXIS_STREAM_STATE_DIR": "/srv/s", "AXIS_STREAM_WATCH_DIR": "/srv/w",
           "AXIS_STREAM_DATA_ROOT": "/data"}
    cfg = config.load(path, env=env)
    assert (cfg.paths.state_dir, cfg.paths.watch_dir, cfg.paths.data_root) == \
        (Path("/srv/s"), Path("/srv/w"), Path("/data"))
    assert config.load(path, env={"AXIS_STREAM_STATE_DIR": ""}).paths.state_dir == tmp_path / "state"


def test_start_scale_defaults_to_auto_loads_a_number_and_says_why_a_bad_one_is_refused(tmp_path):
    assert config.AdaptConfig().start_scale == "auto"
    assert config.load(write(tmp_path, "[adapt]\nstart_scale = 'auto'\n"), env={}).adapt.start_scale == "auto"
    zero = config.load(write(tmp_path, "[adapt]\nstart_scale = 0\n"), env={}).adapt.start_scale
    assert zero == 0.0 and type(zero) is float
    assert config.load(write(tmp_path, "[adapt]\nstart_scale = 0.3\n"), env={}).adapt.start_scale == 0.3
    with pytest.raises(ConfigError, match=r"adapt.start_scale: must be a finite number >= 0 or \"auto\" .* got -1.0"):
        config.load(write(tmp_path, "[adapt]\nstart_scale = -1\n"), env={})
    for bad in ("'Auto0'", "true", "[1]", "inf"):
        with pytest.raises(ConfigError, match=r"adapt.start_scale"):
            config.load(write(tmp_path, f"[adapt]\nstart_scale = {bad}\n"), env={})


def test_a_trigger_table_loads(tmp_path):
    cfg = config.load(write(tmp_path, "[[scheduler.triggers]]\ntarget = 'flowers102'\nevery_folds = 5\n"),
                      env={})
    assert cfg.scheduler.triggers == [config.TriggerConfig(target="flowers102", every_folds=5)]
