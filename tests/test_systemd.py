"""The systemd unit: the settings the service relies on, and `systemd-analyze verify` where it exists."""

from __future__ import annotations

import shutil
import subprocess
from collections import defaultdict
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[1] / "systemd" / "axis-stream.service"


def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """{section: {key: [values in order]}}; repeated keys (DeviceAllow=, Environment=) accumulate."""
    sections: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    section = ""
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        sections[section][key].append(value)
    return sections


def test_unit_has_the_settings_the_daemon_relies_on():
    service = parse_unit(UNIT)["Service"]
    one = {k: v[-1] for k, v in service.items()}
    assert one["Type"] == "notify" and one["NotifyAccess"] == "main"
    assert "axis-stream serve --config /etc/axis-stream/axis-stream.toml" in one["ExecStart"]
    assert one["Restart"] == "on-failure"
    assert int(one["WatchdogSec"]) > 0 and one["KillMode"] == "mixed" and "TimeoutStopSec" in one
    assert one["User"] == "axis-stream" and "DynamicUser" not in service
    for key in ("StateDirectory", "CacheDirectory", "LogsDirectory"):
        assert one[key] == "axis-stream"
    for key in ("NoNewPrivileges", "PrivateTmp", "ProtectHome"):
        assert one[key] == "yes", key
    assert one["ProtectSystem"] == "strict" and "/srv/axis-stream" in one["ReadWritePaths"].split()
    assert "AXIS_STREAM_STATE_DIR=/var/lib/axis-stream" in service["Environment"]


def test_unit_gives_gpu_access_and_nothing_that_breaks_cuda():
    service = parse_unit(UNIT)["Service"]
    assert service["DevicePolicy"] == ["closed"]
    allowed = {v.split()[0]: v.split()[1] for v in service["DeviceAllow"]}
    for node in ("char-nvidia*", "/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools"):
        assert allowed.get(node) == "rw", node
    assert "PrivateDevices" not in service and "MemoryDenyWriteExecute" not in service


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verify_accepts_the_unit(tmp_path):
    # verify prints problems (unknown keys, bad values) as warnings with exit status 0: read them.
    proc = subprocess.run(["systemd-analyze", "verify", str(UNIT)], capture_output=True, text=True,
                          timeout=60, cwd=tmp_path)
    ours = [line for line in (proc.stdout + proc.stderr).splitlines() if UNIT.name in line]
    assert proc.returncode == 0 and not ours, proc.stdout + proc.stderr
