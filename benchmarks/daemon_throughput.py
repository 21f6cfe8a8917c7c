"""Daemon throughput and overhead: `axis-stream serve` against bare `Basis.fold_checkpoint` on the same files.

For each model (the tiny test CLIP and ViT-B-32 with random weights, pretrained=None) this makes
``2N`` fine-tuned-like checkpoints (low-rank plus noise changes to the visual tower), then:

- latency, for each of the first N in turn: the bare ``Basis.fold_checkpoint`` of the file into a
  fresh basis (read, validate, fold, write the new version durably) in a worker process that loaded
  the base as the daemon does, then the same
  file renamed into the watched folder of ``axis-stream serve`` (a subprocess with its own fresh
  basis), timed from the rename ("arrival") to the moment ``CURRENT`` names the new version
  (durable: written, fsynced and renamed by the daemon). Measuring each pair back to back makes a
  busy machine's drift hit both sides of a ratio alike;
- throughput: the other N folded bare one after another (the sum of their fold times), then renamed into the watched folder at
  once and timed until the last one's version is current.

Reported: the ratio of the daemon's arrival-to-durable time to the bare fold time of the same file
(median and quartiles over the N; the target is a median under 1.10); the time from arrival to the
daemon opening the file (arrival detection and queueing: what the daemon adds before its fold,
seen with inotify, and as a share of the bare fold time); and checkpoints per minute. Both sides run with OMP_WAIT_POLICY=PASSIVE, as the systemd unit sets it.

    python benchmarks/daemon_throughput.py                          # tiny (N=10) and ViT-B-32 (N=3)
    python benchmarks/daemon_throughput.py --models tiny --files 20
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts its OpenMP threads

import argparse
import json
import select
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch
from safetensors.torch import save_file

from axis_stream import config
from axis_stream.service.foldworker import default_memory_budget, fold_threads
from axis_stream.store import models
from axis_stream.store.basis import Basis
from axis_stream.store.models import load_base
from axis_stream.testing import write_checkpoints

MODELS = {"tiny": 10, "ViT-B-32": 3}     # model -> default N (2N checkpoints in all)


def make_base(name: str, ws: Path) -> tuple[config.BaseConfig, dict[str, torch.Tensor]]:
    """The base with seeded random weights, saved to a local file the config points at."""
    torch.manual_seed(0)
    if name == "tiny":
        cfg_path = ws / "axis-tiny.json"
        cfg_path.write_text(json.dumps(models.TINY_CLIP))
        model = models.create_base(config.BaseConfig(model="axis-tiny", pretrained="", model_config=cfg_path))
    else:
        cfg_path = None
        model = models.create_base(config.BaseConfig(model=name, pretrained=""))
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    weights = ws / "base.safetensors"
    save_file(state, weights)
    return config.BaseConfig(model=model_name(name), pretrained=str(weights), model_config=cfg_path), state


def model_name(name: str) -> str:
    return "axis-tiny" if name == "tiny" else name


def write_config(ws: Path, base: config.BaseConfig) -> tuple[Path, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    path = ws / "axis-stream.toml"
    path.write_text(f"""[paths]
state_dir = "{ws / 'state'}"
watch_dir = "{ws / 'incoming'}"
[base]
model = "{base.model}"
pretrained = "{base.pretrained}"
model_config = "{base.model_config or ''}"
[metrics]
address = "{address}"
[log]
level = "WARNING"
""")
    return path, address


def current_version(basis_dir: Path) -> int:
    try:
        return int((basis_dir / "CURRENT").read_text().strip()[1:])
    except (FileNotFoundError, ValueError):
        return -1


def wait_version(basis_dir: Path, version: int, proc: subprocess.Popen, timeout: float = 1800) -> float:
    """Poll ``CURRENT`` every 2 ms until it names ``version``; the moment it does."""
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        if current_version(basis_dir) >= version:
            return time.perf_counter()
        if proc.poll() is not None:
            raise SystemExit(f"the daemon exited with {proc.returncode}")
        time.sleep(0.002)
    raise SystemExit(f"version {version} did not appear within {timeout} s")


def bare_worker(cfg_path: Path, basis_dir: Path) -> None:
    """Subprocess side of the bare measurement: load the base as the daemon does, create a basis,
    then fold each path read from stdin, with the daemon's fold threads, and print the seconds
    ``fold_checkpoint`` took."""
    cfg = config.load(cfg_path, env={})
    base, identity = load_base(cfg)
    basis = Basis.create(basis_dir, base, cfg.basis, identity)
    workers, budget = fold_threads(cfg.watch), default_memory_budget()   # as serve sets them at start
    print("ready", flush=True)
    for line in sys.stdin:
        start = time.perf_counter()
        basis.fold_checkpoint(Path(line.strip()), workers=workers, memory_budget=budget)
        print(time.perf_counter() - start, flush=True)


class Bare:
    """The bare folds in their own process, so that both sides start equally warm."""

    def __init__(self, cfg_path: Path, basis_dir: Path):
        self.proc = subprocess.Popen([sys.executable, __file__, "--bare-worker", str(cfg_path), str(basis_dir)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        if self.proc.stdout.readline().strip() != "ready":
            raise SystemExit("the bare fold worker did not start")

    def fold(self, path: Path) -> float:
        """The worker's fold time of ``path``; meanwhile this process polls every 2 ms, exactly as
        it does while the daemon folds, so both sides share the CPU with the same neighbour."""
        self.proc.stdin.write(f"{path}\n")
        self.proc.stdin.flush()
        while not select.select([self.proc.stdout], [], [], 0)[0]:
            time.sleep(0.002)
        return float(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(60)


class OpenProbe:
    """When the daemon first opens each file of the watched folder (inotify IN_OPEN, via watchdog):
    the end of its arrival detection and queueing, the start of its fold."""

    def __init__(self, folder: Path):
        from watchdog.events import FileSystemEventHandler
        from watchdog.observers.inotify import InotifyObserver

        self.opened: dict[str, float] = {}
        opened = self.opened

        class Handler(FileSystemEventHandler):
            def on_opened(self, event) -> None:
                opened.setdefault(Path(event.src_path).name, time.perf_counter())

        self._observer = InotifyObserver()
        self._observer.schedule(Handler(), str(folder))
        self._observer.start()

    def wait(self, name: str, timeout: float = 60) -> float:
        deadline = time.perf_counter() + timeout
        while name not in self.opened:
            if time.perf_counter() > deadline:
                raise SystemExit(f"the daemon did not open {name} within {timeout} s")
            time.sleep(0.001)
        return self.opened[name]

    def stop(self) -> None:
        self._observer.stop()
        self._observer.join()


def start_daemon(cfg_path: Path, address: str) -> tuple[subprocess.Popen, float]:
    """``axis-stream serve`` in a subprocess, once /readyz answers 200; (process, start-up seconds)."""
    log = open(cfg_path.parent / "serve.log", "w")  # noqa: SIM115 (the daemon's log, open for its life)
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", "from axis_stream.cli import main; main()", "serve",
                             "--config", str(cfg_path)], stdout=log, stderr=subprocess.STDOUT)
    while True:
        try:
            with urllib.request.urlopen(f"http://{address}/readyz", timeout=2) as r:
                if r.status == 200:
                    return proc, time.perf_counter() - t0
        except OSError:
            pass
        if proc.poll() is not None:
            raise SystemExit(f"the daemon exited with {proc.returncode}; see {log.name}")
        time.sleep(0.05)


def run(name: str, n: int, root: Path) -> dict:
    ws = root / name
    ws.mkdir(parents=True)
    base_cfg, base = make_base(name, ws)
    files = write_checkpoints(base, 2 * n, ws / "staging")
    size = files[0].stat().st_size
    cfg_path, address = write_config(ws, base_cfg)
    cfg = config.load(cfg_path, env={})
    worker = Bare(cfg_path, ws / "bare-basis")
    proc, startup = start_daemon(cfg_path, address)
    probe = OpenProbe(cfg.paths.watch_dir)
    bare, latencies, dispatch = [], [], []
    try:
        for i, path in enumerate(files[:n], 1):
            bare.append(worker.fold(path))
            arrival = time.perf_counter()
            os.rename(path, cfg.paths.watch_dir / path.name)
            latencies.append(wait_version(cfg.paths.basis_dir, i, proc) - arrival)
            dispatch.append(probe.wait(path.name) - arrival)
        bare_burst = sum(worker.fold(path) for path in files[n:])
        start = time.perf_counter()
        for path in files[n:]:
            os.rename(path, cfg.paths.watch_dir / path.name)
        burst = wait_version(cfg.paths.basis_dir, len(files), proc) - start
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)
        worker.close()
        probe.stop()
    ratios = [lat / b for lat, b in zip(latencies, bare)]
    quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
    return {"model": name, "files": 2 * n, "checkpoint_mib": size / 2**20,
            "daemon_startup_s": startup,
            "bare_fold_s_median": statistics.median(bare), "bare_fold_s": bare,
            "arrival_to_durable_s_median": statistics.median(latencies), "arrival_to_durable_s": latencies,
            "ratio_median": statistics.median(ratios), "ratio_quartiles": [quartiles[0], quartiles[2]],
            "dispatch_s_median": statistics.median(dispatch), "dispatch_s": dispatch,
            "dispatch_over_bare_median": statistics.median(d / b for d, b in zip(dispatch, bare)),
            "ratios": ratios,
            "burst_files": len(files) - n, "burst_s": burst, "bare_burst_s": bare_burst,
            "daemon_per_minute": 60 * (len(files) - n) / burst,
            "bare_per_minute": 60 * (len(files) - n) / bare_burst}


def main() -> None:
    if sys.argv[1:2] == ["--bare-worker"]:
        return bare_worker(Path(sys.argv[2]), Path(sys.argv[3]))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--files", type=int, help="N per model (2N checkpoints); default: tiny 10, ViT-B-32 3")
    ap.add_argument("--workdir", type=Path, help="where checkpoints and bases go (default: a temporary folder)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="axis-daemon-bench-", dir=args.workdir) as tmp:
        results = [run(name, args.files or MODELS[name], Path(tmp)) for name in args.models]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
          f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}")
    print("| model | checkpoint | bare fold | arrival -> durable | ratio (quartiles) | arrival -> fold starts "
          "| daemon ckpt/min (burst) | bare ckpt/min | daemon start-up |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        q1, q3 = r["ratio_quartiles"]
        print(f"| {r['model']} | {r['checkpoint_mib']:.0f} MiB | {r['bare_fold_s_median']:.3f} s "
              f"| {r['arrival_to_durable_s_median']:.3f} s | {r['ratio_median']:.2f} ({q1:.2f}-{q3:.2f}) "
              f"| {1000 * r['dispatch_s_median']:.1f} ms ({r['dispatch_over_bare_median']:.1%}) "
              f"| {r['daemon_per_minute']:.1f} ({r['burst_files']} files) | {r['bare_per_minute']:.1f} "
              f"| {r['daemon_startup_s']:.1f} s |")
    print("(times and ratios: medians over the N files dropped one at a time; ratio = arrival -> durable "
          "over the bare fold time of the same file)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
