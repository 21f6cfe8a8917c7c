"""Control socket: line protocol, refusals that keep the server serving, socket file handling, client, CLI."""

from __future__ import annotations

import json
import os
import socket
import stat

import pytest
from click.testing import CliRunner
from test_jobs import final, make_config

from axis_stream import cli
from axis_stream.errors import AxisError
from axis_stream.service import api
from axis_stream.service.jobs.control import handlers
from axis_stream.service.jobs.kinds import adapt_request
from axis_stream.service.jobs.runner import JobRunner


def _need(args):
    return {"twice": 2 * api.arg(args, "n", int)}


def _boom(args):
    raise RuntimeError("kaboom\nsecond line")


def _refuse(args):
    raise AxisError("refused on purpose")


HANDLERS = {"echo": lambda args: args, "need": _need, "boom": _boom, "refuse": _refuse}


@pytest.fixture
def server(tmp_path):
    srv = api.ControlServer(tmp_path / "control.sock", HANDLERS)
    srv.start()
    yield srv
    srv.stop()


def exchange(conn: socket.socket, payload: bytes) -> dict:
    """Send raw bytes on an open connection and read one reply line."""
    conn.sendall(payload)
    reply = b""
    while not reply.endswith(b"\n"):
        chunk = conn.recv(65536)
        assert chunk, "server closed the connection"
        reply += chunk
    return json.loads(reply)


def test_socket_file_has_mode_0660_and_is_removed_on_stop(tmp_path):
    srv = api.ControlServer(tmp_path / "control.sock", HANDLERS)
    srv.start()
    mode = os.stat(srv.socket_path).st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o660
    assert [p.name for p in tmp_path.iterdir()] == ["control.sock"]      # no temporary name left behind
    srv.stop()
    assert not srv.socket_path.exists()


def test_malformed_requests_are_refused_and_the_server_keeps_serving(server):
    bad = [
        (b"{not json\n", "malformed request: not JSON"),
        (b"\xff\xfe\n", "malformed request: not JSON"),
        (b"[1, 2]\n", "expected a JSON object"),
        (b'{"args": {}}\n', "'op' must be a string"),
        (b'{"op": "echo", "args": [1]}\n', "'args' of 'echo' must be an object"),
        (b'{"op": "nope"}\n', "unknown op 'nope'; known: boom, echo, need, refuse"),
        (b'{"op": "need", "args": {}}\n', "need: missing argument 'n'"),
        (b'{"op": "need", "args": {"n": "3"}}\n', "need: argument 'n' must be int, got str '3'"),
        (b'{"op": "refuse"}\n', "refused on purpose"),
        (b'{"op": "boom"}\n', "internal error in boom: RuntimeError: kaboom second line"),
        (b'{"op": "echo", "args": {"x": "' + b"a" * (2 << 20) + b'"}}\n',
         f"request larger than {api.MAX_REQUEST_BYTES} bytes"),
    ]
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(10)
        conn.connect(str(server.socket_path))
        for payload, message in bad:
            reply = exchange(conn, payload)
            assert reply["ok"] is False and message in reply["error"] and "\n" not in reply["error"]
            assert exchange(conn, b'{"op": "need", "args": {"n": 21}}\n') == {"ok": True, "result": {"twice": 42}}
    assert api.request(server.socket_path, "echo", a=[1, "b"]) == {"a": [1, "b"]}      # and on a new connection


def test_client_raises_the_daemons_message_and_daemon_not_running(server, tmp_path):
    with pytest.raises(AxisError, match="^need: missing argument 'n'$"):
        api.request(server.socket_path, "need")
    with pytest.raises(api.DaemonNotRunning, match=f"no daemon is listening on {tmp_path / 'absent.sock'}"):
        api.request(tmp_path / "absent.sock", "status")


def test_stale_socket_is_replaced_but_a_live_one_or_a_regular_file_is_not(tmp_path, server):
    stale = tmp_path / "stale.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(stale))                         # a socket file whose owner died: nothing listens
    dead.close()
    with pytest.raises(api.DaemonNotRunning):
        api.request(stale, "echo")
    srv = api.ControlServer(stale, HANDLERS)
    srv.start()
    assert api.request(stale, "echo", ok=1) == {"ok": 1}
    srv.stop()

    with pytest.raises(AxisError, match="another daemon is already listening"):
        api.ControlServer(server.socket_path, HANDLERS).start()
    assert api.request(server.socket_path, "echo") == {}              # the first server is untouched
    regular = tmp_path / "file.sock"
    regular.write_text("keep me")
    with pytest.raises(AxisError, match="exists and is not a socket"):
        api.ControlServer(regular, HANDLERS).start()
    assert regular.read_text() == "keep me"


@pytest.fixture
def daemon(tmp_path, monkeypatch):
    """A job runner behind a control server, as the daemon wires them; ``adapt`` runs a selftest job."""
    cfg = make_config(tmp_path / "state")
    runner = JobRunner(cfg, cfg.paths.basis_dir, kill_grace_s=2.0)
    runner.start()
    ops = handlers(runner)
    real_adapt = ops["adapt"]

    def adapt(args):
        adapt_request(args, cfg)              # same checks as the real op
        return runner.get(runner.submit("selftest", {"steps": 3, "seed": args.get("seed", 0)})).to_dict()

    srv = api.ControlServer(cfg.paths.socket, {**ops, "adapt": adapt, "adapt.real": real_adapt})
    srv.start()
    monkeypatch.setenv("AXIS_STREAM_STATE_DIR", str(cfg.paths.state_dir))
    yield runner, cfg.paths.socket
    srv.stop()
    runner.shutdown()


def test_job_ops_over_the_socket(daemon):
    runner, sock = daemon
    record = api.request(sock, "adapt.real", target="flowers102", epochs=2, data_root=str(sock.parent))
    assert (record["kind"], record["state"], record["params"]["epochs"]) == ("adapt", "queued", 2)
    with pytest.raises(AxisError, match="unknown adapt parameter.* epoch;"):
        api.request(sock, "adapt.real", target="flowers102", epoch=2)
    with pytest.raises(AxisError, match=r"adapt.epochs: must be >= 1, got 0"):
        api.request(sock, "adapt.real", target="flowers102", epochs=0)

    job_id = api.request(sock, "adapt", target="flowers102", data_root=str(sock.parent))["id"]
    final(runner, job_id)
    shown = api.request(sock, "jobs.show", id=job_id)
    assert shown["state"] == "succeeded" and shown["result"]["steps"] == 3
    assert [j["id"] for j in api.request(sock, "jobs.list", limit=1)["jobs"]] == [job_id]
    whole = api.request(sock, "jobs.logs", id=job_id, offset=0)
    assert "selftest: fitting" in whole["text"] and whole["offset"] == len(whole["text"].encode())
    assert api.request(sock, "jobs.logs", id=job_id, offset=whole["offset"])["text"] == ""
    assert api.request(sock, "jobs.logs", id=job_id, tail=1)["text"].count("\n") == 1
    with pytest.raises(AxisError, match=f"job {job_id} already succeeded"):
        api.request(sock, "jobs.cancel", id=job_id)
    with pytest.raises(AxisError, match="no job 'j0'"):
        api.request(sock, "jobs.show", id="j0")
    with pytest.raises(AxisError, match="limit must be between 1 and 10000"):
        api.request(sock, "jobs.list", limit=0)


def test_cli_talks_to_the_daemon(daemon):
    runner, sock = daemon
    cli_runner = CliRunner()
    result = cli_runner.invoke(cli.main, ["adapt", "--target", "flowers102", "--seed", "2", "--wait",
                                          "--data-root", str(sock.parent)])
    assert result.exit_code == 0, result.output
    job_id = result.output.split()[2].rstrip(":")
    assert result.output.startswith(f"queued job {job_id}: adapt flowers102")
    end = result.output.splitlines()[-3:]        # how --wait ends: the outcome, the result, the log; no dicts
    assert end[0].startswith(f"job {job_id} succeeded in 0:00:") and end[1].startswith("result: w ") and "steps 3" in end[1]
    assert end[2] == f"log: {runner.get(job_id).log_path}" and "{" not in result.output

    listed = cli_runner.invoke(cli.main, ["jobs", "list"])
    assert listed.exit_code == 0 and listed.output.splitlines()[1].split()[:3] == [job_id, "succeeded", "selftest"]
    shown = cli_runner.invoke(cli.main, ["jobs", "show", job_id, "--json"])
    assert json.loads(shown.output)["result"] == runner.get(job_id).result
    logs = cli_runner.invoke(cli.main, ["jobs", "logs", job_id, "--follow"])
    assert logs.exit_code == 0 and "selftest: fitting" in logs.output
    cancel = cli_runner.invoke(cli.main, ["jobs", "cancel", job_id])
    assert cancel.exit_code == 1 and f"job {job_id} already succeeded" in cancel.output
    status = cli_runner.invoke(cli.main, ["status"])
    assert status.exit_code == 1 and "unknown op 'status'" in status.output    # the daemon adds that op


@pytest.mark.parametrize("argv, hint", [
    (["adapt", "--target", "flowers102"], "start `axis-stream serve` or rerun with --local"),
    (["status"], "start `axis-stream serve`"),
    (["jobs", "list"], "start `axis-stream serve`"),
])
def test_cli_without_a_daemon_says_so_and_exits_2(tmp_path, monkeypatch, argv, hint):
    monkeypatch.setenv("AXIS_STREAM_STATE_DIR", str(tmp_path))
    result = CliRunner().invoke(cli.main, argv)
    assert result.exit_code == 2
    assert result.output == f"no daemon is listening on {tmp_path / 'control.sock'}; {hint}\n"
