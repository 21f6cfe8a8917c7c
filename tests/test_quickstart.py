"""The quickstart end to end (in process, with fewer steps), and the generated tasks it relies on."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys

import numpy as np
from click.testing import CliRunner

from axis_stream import config
from axis_stream.cli import main
from axis_stream.errors import AxisError
from axis_stream.service import api, quickstart
from axis_stream.testing import wait_until


def test_tasks_are_deterministic_and_classes_differ():
    a_images, a_labels = quickstart.draw(quickstart.TARGET, 5, seed=3)
    b_images, b_labels = quickstart.draw(quickstart.TARGET, 5, seed=3)
    assert a_images.shape == (20, quickstart.IMAGE_SIZE, quickstart.IMAGE_SIZE, 3) and a_images.dtype == np.uint8
    assert np.array_equal(a_images, b_images) and list(a_labels) == [0] * 5 + [1] * 5 + [2] * 5 + [3] * 5
    means = [a_images[a_labels == c].reshape(5, -1).astype(float).mean(0) for c in range(4)]
    assert min(np.abs(means[i] - means[j]).mean() for i in range(4) for j in range(i + 1, 4)) > 5
    names = [n for t in quickstart.SOURCES + (quickstart.TARGET,) for n in t.classnames]
    assert len(quickstart.TARGET.classnames) == len(set(quickstart.TARGET.classnames)) == 4
    assert not set(quickstart.TARGET.classnames) & set(names[:12])     # the target is a new task


def test_quickstart_runs_the_whole_product(tmp_path):
    env, handlers = os.environ.get("OMP_NUM_THREADS"), logging.getLogger().handlers[:]
    lines = list(quickstart.run(tmp_path / "ws", steps=15, epochs=1))
    assert os.environ.get("OMP_NUM_THREADS") == env and logging.getLogger().handlers == handlers   # restored
    text = "\n".join(lines)
    ws = tmp_path / "ws"
    for task in quickstart.SOURCES:                     # real fine-tunes: better than zero-shot
        before, after = map(int, re.search(rf"fine-tuned {task.name} .* (\d+)% -> (\d+)%", text).groups())
        assert after > before, text
    assert "basis version 3: 3 sources folded" in text
    ledger = [line for line in lines if re.match(r"  v\d ", line)]
    assert [line.split()[1].rstrip(":") for line in ledger] == [f"{t.name}.safetensors" for t in quickstart.SOURCES]
    assert re.search(r"job \S+ succeeded in .* test accuracy \d+% \(merged basis\) -> \d+% \(adapted\)", text), text
    assert 'axis_stream_folds_total{result="folded"} 3.0' in text
    assert "axis_stream_basis_version 3.0" in text
    assert re.search(r'axis_stream_last_accuracy_ratio\{target="target-mixed"\} [0-9.]+', text), text
    assert re.search(r'axis_stream_adapt_start_scale\{target="target-mixed"\} [0-9.]+', text), text   # auto's choice
    assert 'axis_stream_jobs{state="succeeded"} 1.0' in text
    assert not any((ws / "incoming").iterdir()) and not any((ws / "state" / "quarantine").iterdir())
    (job_dir,) = [p for p in (ws / "state" / "jobs").iterdir() if p.is_dir()]
    report = json.loads((job_dir / "report.json").read_text())
    assert report["basis_version"] == 3 and (job_dir / "lambda.safetensors").is_file()
    assert "folded source-colours.safetensors into v1" in (ws / "axis-stream.log").read_text()
    assert not (ws / "state" / "control.sock").exists()            # the daemon stopped cleanly
    logs = (ws / "axis-stream.log").read_text() + (job_dir / "job.log").read_text()
    assert " root: " not in logs and "Traceback" not in logs                # no open_clip noise (issue 26)

    # the command it prints last runs the daemon on the workspace, as printed (issue 26 item 8)
    assert lines[-1].startswith("done in ") and "; run the daemon yourself: axis-stream serve --config " in lines[-1]
    command = lines[-1].split("run the daemon yourself: ")[1].split()
    assert command[:3] == ["axis-stream", "serve", "--config"]
    cfg = config.load(command[3], env={})
    proc = subprocess.Popen([sys.executable, "-c", "from axis_stream.cli import main; main()", *command[1:]],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        status = wait_until(lambda: _ready_status(cfg.paths.socket), 120, "the daemon on the workspace ready",
                            alive=lambda: proc.poll() is not None and f"serve exited with {proc.returncode}")
        assert status["ready"] and status["basis"]["version"] == 3 and status["basis"]["sources"] == 3
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "WARNING" not in err and " root: " not in err, err


def _status(socket_path):
    try:
        return api.request(socket_path, "status")
    except (api.DaemonNotRunning, AxisError):
        return None


def _ready_status(socket_path):
    """The status once the daemon says it is ready (the control socket answers a moment before)."""
    status = _status(socket_path)
    return status if status and status.get("ready") else None


def test_cli_offers_the_quickstart():
    result = CliRunner().invoke(main, ["quickstart", "--help"])
    assert result.exit_code == 0 and "--workdir" in result.output
