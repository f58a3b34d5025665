"""A first run that works: what a new user meets, each as one clear line.

A port in use, an unreachable or malformed --target, flags named in messages
(--overwrite, not overwrite=True), a device this machine lacks, progress bars
that count the model's parameters per named stage, help on every option, and
the coordinator YAML that takes the CLI's names. Real files, loopback only.
"""

from __future__ import annotations

import ast
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import click
import pytest
import torch
from click.testing import CliRunner
from tqdm import tqdm

from tests.helpers import write_family
from tiesfed.cli import main
from tiesfed.client.contribution import iter_contribution
from tiesfed.client.federated import Retry, submit
from tiesfed.coordinator.rounds import ParticipantConfig, RoundConfig
from tiesfed.coordinator.server import CoordinatorConfig, CoordinatorServer, load_coordinator_config
from tiesfed.core.methods import get_method
from tiesfed.core.options import MergeConfig, MergeOptions, ModelEntry
from tiesfed.engine import merge
from tiesfed.io.model_io import ModelReader, mergeable

ROOT = Path(__file__).resolve().parent.parent
CLIENTS = ["org-a", "org-b", "org-c"]
FAST = Retry(attempts=4, backoff_s=0.05, max_backoff_s=0.2)


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    _, _, base_dir, paths = write_family(tmp_path_factory.mktemp("firstrun"), 3, seed=11)
    return base_dir, paths


@pytest.fixture(scope="module")
def params(family) -> int:
    with ModelReader(family[0]) as r:
        return sum(t.numel for t in mergeable(r.manifest()))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.strip()]


def one_line_error(res, *needles: str) -> str:
    """The command failed with exactly one line, `Error: ...`, holding every needle; no traceback."""
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
    out = lines(res.output)
    assert len(out) == 1 and out[0].startswith("Error: "), res.output
    for n in needles:
        assert n in out[0], (n, out[0])
    return out[0]


# ----------------------------------------------------------------------------- a port in use


def test_port_in_use_is_one_line_before_ray_starts(pki, tmp_path, monkeypatch):
    import tiesfed.coordinator.ray_factory as ray_factory

    def no_ray(*a, **kw):
        raise AssertionError("Ray was started for a coordinator that cannot listen")

    monkeypatch.setattr(ray_factory, "init_ray", no_ray)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        res = CliRunner().invoke(main, ["coordinator", "serve", "--listen", f"127.0.0.1:{port}", "--tls",
                                        str(pki.server), "--spool", str(tmp_path / "spool")])
        one_line_error(res, f"127.0.0.1:{port}", "already in use")
        # the spool lock was let go: the same spool serves at once on a free port
        srv = CoordinatorServer(CoordinatorConfig(listen="127.0.0.1:0", spool_dir=tmp_path / "spool",
                                                  tls_dir=pki.server, aggregator="local")).start()
        srv.stop(grace=0)
        # a bound but not yet listening socket holds the port too
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        port = held.getsockname()[1]
        with pytest.raises(OSError, match=f"127.0.0.1:{port}: port {port} is already in use"):
            CoordinatorServer(CoordinatorConfig(listen=f"127.0.0.1:{port}", spool_dir=tmp_path / "spool2",
                                                insecure=True, aggregator="local")).start()


def test_port_in_use_in_a_real_process_is_one_line_fast(pki, tmp_path):
    """As a user runs it: a process, the default (Ray) aggregator, stderr one line, no Ray."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = time.monotonic()
        res = subprocess.run([sys.executable, "-m", "tiesfed.cli", "coordinator", "serve", "--listen",
                              f"127.0.0.1:{port}", "--tls", str(pki.server), "--spool", str(tmp_path / "spool")],
                             capture_output=True, text=True, timeout=120, cwd=tmp_path)
        took = time.monotonic() - started
    assert res.returncode == 1, res.stderr
    assert lines(res.stderr) == [f"Error: cannot listen on 127.0.0.1:{port}: port {port} is already in use "
                                 "(another coordinator? --listen HOST:0 picks a free port)"], res.stderr
    assert res.stdout == ""
    assert took < 60, f"{took:.0f} s: it should fail before starting anything"


def test_malformed_listen_is_one_line(pki, tmp_path):
    res = CliRunner().invoke(main, ["coordinator", "serve", "--listen", "127.0.0.1", "--tls", str(pki.server),
                                    "--spool", str(tmp_path / "spool"), "--aggregator", "local"])
    one_line_error(res, "--listen '127.0.0.1' must be HOST:PORT")


# ----------------------------------------------------------------------------- --target


def test_unreachable_target_shows_its_waits(family, tmp_path):
    port = free_port()  # nobody listens there
    res = CliRunner().invoke(main, ["client", "submit", str(family[0]), str(family[1][0]), "--target",
                                    f"127.0.0.1:{port}", "--round", "r1", "--insecure", "--client-id", "org-a",
                                    "-q", "--wait-for-coordinator", "5.5"])
    assert res.exit_code == 1, res.output
    assert f"waiting for the coordinator at 127.0.0.1:{port}: 5 of 5.5 s" in res.stderr, res.stderr
    assert lines(res.output)[-1].startswith(f"Error: no coordinator answered at 127.0.0.1:{port} within 5.5 s")


def test_unreachable_target_shows_its_retries(family, tmp_path):
    port = free_port()
    res = CliRunner().invoke(main, ["client", "fetch", str(family[0]), "-o", str(tmp_path / "out"), "--target",
                                    f"127.0.0.1:{port}", "--round", "r1", "--insecure", "--client-id", "org-a",
                                    "-q", "--wait-for-coordinator", "0", "--retries", "2"])
    assert res.exit_code == 1, res.output
    retries = [ln for ln in lines(res.stderr) if "retry" in ln]
    assert len(retries) == 2 and all(f"GetRoundSpec at 127.0.0.1:{port}: UNAVAILABLE" in ln for ln in retries)
    assert "retry 1 of 2" in retries[0] and "retry 2 of 2" in retries[1]
    assert lines(res.output)[-1].startswith("Error: GetRoundSpec for 'org-a' at 127.0.0.1")


@pytest.mark.parametrize("target", ["localhost", "127.0.0.1:", "127.0.0.1:http", "host:99999", "http://h:1", ":50051"])
@pytest.mark.parametrize("command", ["submit", "fetch", "open", "close", "status"])
def test_a_target_without_a_port_is_one_line(family, tmp_path, target, command):
    args = {
        "submit": ["client", "submit", str(family[0]), str(family[1][0]), "--round", "r1", "--insecure",
                   "--client-id", "a", "-q"],
        "fetch": ["client", "fetch", str(family[0]), "-o", str(tmp_path / "o"), "--round", "r1", "--insecure",
                  "--client-id", "a", "-q"],
        "open": ["coordinator", "open", "--round", "r1", "--clients", "a", "--insecure", "--admin-token", "t"],
        "close": ["coordinator", "close", "--round", "r1", "--insecure", "--admin-token", "t"],
        "status": ["coordinator", "status", "--round", "r1", "--insecure", "--client-id", "a"],
    }[command]
    if command == "status" and "status" not in main.commands["coordinator"].commands:
        pytest.skip("no `tiesfed coordinator status` here")
    started = time.monotonic()
    res = CliRunner().invoke(main, args + ["--target", target])
    one_line_error(res, repr(target), "must be HOST:PORT")
    assert time.monotonic() - started < 10  # no dial, no wait


# ----------------------------------------------------------------------------- flags in messages


def test_no_message_names_a_python_keyword_argument():
    """`raise ...("... overwrite=True")` tells a CLI user nothing: messages name flags."""
    bad = []
    for path in (ROOT / "tiesfed").rglob("*.py"):
        if "_pb2" in path.name:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Raise) and node.exc is not None:
                for c in ast.walk(node.exc):
                    if isinstance(c, ast.Constant) and isinstance(c.value, str) and re.search(
                            r"\b[a-z_]+=(True|False)\b", c.value):
                        bad.append(f"{path.relative_to(ROOT)}:{c.lineno}: {c.value!r}")
    assert bad == []


def test_merge_into_a_model_folder_names_overwrite_before_any_work(family, tmp_path, monkeypatch):
    import tiesfed.engine.local as engine

    out = tmp_path / "merged"
    args = ["merge", str(family[0]), *map(str, family[1][:2]), "-o", str(out), "-q"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output

    def no_read(*a, **kw):
        raise AssertionError("read a model before refusing the output folder")

    with monkeypatch.context() as m:
        m.setattr(engine, "ModelReader", no_read)
        res = CliRunner().invoke(main, args)
    line = one_line_error(res, str(out), "already holds model files", "--overwrite")
    assert "overwrite=True" not in line
    res = CliRunner().invoke(main, args + ["--overwrite"])
    assert res.exit_code == 0, res.output


def test_chunk_size_message_names_the_flag(family):
    res = CliRunner().invoke(main, ["client", "submit", str(family[0]), str(family[1][0]), "--target",
                                    f"127.0.0.1:{free_port()}", "--round", "r1", "--insecure", "--client-id", "a",
                                    "-q", "--chunk-size", "8MiB"])
    line = one_line_error(res, "--chunk-size", "4 MiB")
    assert "chunk_bytes" not in line


def test_validation_errors_name_the_flags_given(family, tmp_path, pki):
    res = CliRunner().invoke(main, ["merge", str(family[0]), str(family[1][0]), "-o", str(tmp_path / "x"),
                                    "--k", "0"])
    assert res.exit_code == 2 and "--k: Input should be greater than 0" in res.output, res.output
    res = CliRunner().invoke(main, ["coordinator", "serve", "--tls", str(pki.server), "--spool",
                                    str(tmp_path / "s"), "--max-active-uploads", "0", "--abandon-after", "-1"])
    assert res.exit_code == 2, res.output
    assert "--max-active-uploads: Input should be greater than or equal to 1" in res.output
    assert "--abandon-after: Input should be greater than 0" in res.output


@pytest.fixture
def finalized_round(family, tmp_path):
    """An insecure loopback coordinator (local aggregator) whose round r1 is merged."""
    srv = CoordinatorServer(CoordinatorConfig(listen="127.0.0.1:0", spool_dir=tmp_path / "spool",
                                              base_model=str(family[0]), aggregator="local", insecure=True)).start()
    try:
        rnd = srv.manager.open_round(RoundConfig(round_id="r1",
                                                 participants=[ParticipantConfig(client_id=c) for c in CLIENTS]))
        for i, c in enumerate(CLIENTS):
            submit(srv.target, "r1", c, family[0], family[1][i], retry=FAST, insecure=True)
        assert rnd.wait_closed(60) and rnd.state == "finalized"
        yield srv
    finally:
        srv.stop(grace=0)


def test_fetch_refuses_a_non_empty_folder_unless_overwrite(family, tmp_path, finalized_round):
    local = tmp_path / "local"
    merge(MergeConfig(base_model=str(family[0]), models=[ModelEntry(model=str(p)) for p in family[1]]), local,
          progress=False)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    args = ["client", "fetch", str(family[0]), "-o", str(out), "--target", finalized_round.target, "--round", "r1",
            "--insecure", "--client-id", "org-a", "-q", "--timeout", "60"]
    res = CliRunner().invoke(main, args)
    one_line_error(res, str(out), "not empty", "notes.txt", "--overwrite")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]  # nothing downloaded, nothing written

    for _ in range(2):  # into the folder with a note, then into the folder with the model: weights replaced
        res = CliRunner().invoke(main, args + ["--overwrite"])
        assert res.exit_code == 0, res.output
        with ModelReader(out) as got, ModelReader(local) as want:
            assert got.names == want.names
            for n in want.names:
                assert torch.equal(got.get(n), want.get(n)), n
    assert (out / "notes.txt").read_text() == "mine"
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no partial or temporary files left
    res = CliRunner().invoke(main, args)  # and without --overwrite, the merged folder is refused too
    one_line_error(res, "not empty", "--overwrite")


# ----------------------------------------------------------------------------- --device


def _device_args(command: str, family, tmp_path, device: str) -> list[str]:
    if command == "merge":
        return ["merge", str(family[0]), str(family[1][0]), "-o", str(tmp_path / "x"), "--device", device]
    return ["client", "submit", str(family[0]), str(family[1][0]), "--target", f"127.0.0.1:{free_port()}",
            "--round", "r1", "--insecure", "--client-id", "a", "--device", device]


@pytest.mark.parametrize("command", ["merge", "submit"])
def test_unknown_device_is_one_line(family, tmp_path, command):
    for device in ("tpu", "cuda:x", "gpu0"):
        one_line_error(CliRunner().invoke(main, _device_args(command, family, tmp_path, device)),
                       f"--device {device}", "cpu, cuda")
    one_line_error(CliRunner().invoke(main, _device_args(command, family, tmp_path, "meta")), "--device meta")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("command", ["merge", "submit"])
def test_cuda_without_cuda_is_one_line(family, tmp_path, command):
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        one_line_error(CliRunner().invoke(main, _device_args(command, family, tmp_path, f"cuda:{n}")),
                       f"--device cuda:{n}", f"{n} CUDA device(s)")
        return
    for device in ("cuda", "cuda:0"):
        one_line_error(CliRunner().invoke(main, _device_args(command, family, tmp_path, device)),
                       f"--device {device}", "CUDA is not available here", "--device cpu")
    assert not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------- progress


class Recorder:
    """A StageProgress that keeps [desc, total, counted] per stage."""

    def __init__(self) -> None:
        self.stages: list[list] = []

    def stage(self, desc: str, total: int) -> None:
        self.stages.append([desc, total, 0])

    def update(self, n: int) -> None:
        self.stages[-1][2] += n


@pytest.mark.parametrize("trim", ["global", "tensor"])
def test_merge_progress_counts_parameters_per_named_stage(family, tmp_path, params, trim):
    rec = Recorder()
    cfg = MergeConfig(base_model=str(family[0]), models=[ModelEntry(model=str(p)) for p in family[1][:2]],
                      options=MergeOptions(trim=trim))
    merge(cfg, tmp_path / "m", progress=rec)
    want = ["histogram", "merge"] if trim == "global" else ["merge"]
    assert [d for d, _, _ in rec.stages] == want
    assert all(total == params and counted == params for _, total, counted in rec.stages), rec.stages


def test_iter_contribution_stages(family, params):
    rec = Recorder()
    trim = get_method("ties").trim_spec(MergeOptions(), None)
    with ModelReader(family[0]) as b, ModelReader(family[1][0]) as ft:
        n = len(list(iter_contribution(b, ft, trim, model_key="0", progress=rec)))
    assert n == 5
    assert rec.stages == [["histogram", params, params], ["trim+encode", params, params]]


def _bars(stderr: str) -> dict[str, str]:
    """desc -> the last 'n/total' a tqdm bar printed."""
    out: dict[str, str] = {}
    for frame in re.split(r"[\r\n]", stderr):
        m = re.match(r"\s*(.+?):\s+\d+%\|.*?\| (\S+/\S+)", frame)
        if m:
            out[m.group(1)] = m.group(2)
    return out


def test_cli_bars_count_the_model_once_per_stage(family, tmp_path, params, finalized_round):
    n = tqdm.format_sizeof(params)
    res = CliRunner().invoke(main, ["merge", str(family[0]), *map(str, family[1][:2]), "-o", str(tmp_path / "m")])
    assert res.exit_code == 0, res.output
    bars = _bars(res.stderr)
    assert bars == {"histogram": f"{n}/{n}", "merge": f"{n}/{n}"}, res.stderr

    res = CliRunner().invoke(main, ["client", "fetch", str(family[0]), "-o", str(tmp_path / "f"), "--target",
                                    finalized_round.target, "--round", "r1", "--insecure", "--client-id", "org-b",
                                    "--timeout", "60"])
    assert res.exit_code == 0, res.output
    bars = _bars(res.stderr)
    with ModelReader(family[0]) as r:
        every = tqdm.format_sizeof(sum(t.numel for t in r.manifest()))
    assert bars["write"] == f"{every}/{every}" and "download r1" in bars, res.stderr


def test_cli_submit_bars_name_the_trim_stages(family, tmp_path, params):
    srv = CoordinatorServer(CoordinatorConfig(listen="127.0.0.1:0", spool_dir=tmp_path / "spool",
                                              base_model=str(family[0]), aggregator="local", insecure=True)).start()
    try:
        srv.manager.open_round(RoundConfig(round_id="r1", participants=[ParticipantConfig(client_id="org-a")]))
        res = CliRunner().invoke(main, ["client", "submit", str(family[0]), str(family[1][0]), "--target",
                                        srv.target, "--round", "r1", "--insecure", "--client-id", "org-a"])
    finally:
        srv.stop(grace=0)
    assert res.exit_code == 0, res.output
    bars = _bars(res.stderr)
    n = tqdm.format_sizeof(params)
    for s in ("histogram", "trim+encode"):
        assert bars[f"org-a: {s}"] == f"{n}/{n}", res.stderr
    assert "upload org-a" in bars


# ----------------------------------------------------------------------------- help and YAML names


def _options(cmd: click.Command, path: str):
    for p in cmd.params:
        if isinstance(p, click.Option):
            yield path, p
    if isinstance(cmd, click.Group):
        for name, sub in cmd.commands.items():
            yield from _options(sub, f"{path} {name}")


def test_every_option_has_help():
    seen = list(_options(main, "tiesfed"))
    assert len(seen) > 80
    missing = [f"{path} {'/'.join(p.opts)}" for path, p in seen if "--help" not in p.opts and not (p.help or "").strip()]
    assert missing == []


def test_coordinator_yaml_takes_the_cli_names(family, tmp_path, pki):
    cfg_path = tmp_path / "coordinator.yaml"
    cfg_path.write_text(
        f"listen: 127.0.0.1:0\nspool: spool\nbase: {family[0]}\ntls: {pki.server}\ncrl: {pki.crl}\n"
        "round: r1\nclients: org-a, org-b\nweights: [1, 2]\nquorum: 1\ndeadline: 60\nlate-policy: accept\n"
        "option: [k=10, lambda=0.5]\nmax-active-uploads: 3\nabandon_after: 30\naggregator: local\n"
    )
    cfg = load_coordinator_config(cfg_path)
    assert cfg.spool_dir == tmp_path / "spool" and cfg.base_model == str(family[0])
    assert cfg.tls_dir == pki.server and cfg.crl == pki.crl
    assert cfg.max_active_uploads == 3 and cfg.abandon_after_s == 30
    (r,) = cfg.rounds
    assert r.round_id == "r1" and [(p.client_id, p.weight) for p in r.participants] == [("org-a", 1), ("org-b", 2)]
    assert r.quorum == 1 and r.deadline_s == 60 and r.late_policy == "accept"
    assert r.options.k == 10 and r.options.lam == 0.5
    # the same coordinator serves it: the round is open
    srv = CoordinatorServer(cfg).start()
    try:
        assert srv.manager.get("r1").state == "open"
    finally:
        srv.stop(grace=0)

    # shorthand next to `rounds:`, options as a mapping
    cfg_path.write_text("spool: s\nround: r2\nclients: [a]\noptions: {k: 30}\n"
                        "rounds: [{round_id: r1, participants: [b]}]\n")
    cfg = load_coordinator_config(cfg_path)
    assert [r.round_id for r in cfg.rounds] == ["r1", "r2"] and cfg.rounds[1].options.k == 30
    for bad, msg in (("spool: a\nspool_dir: b\n", "same setting"),
                     ("round: r1\n", "round and clients go together"),
                     ("round: r1\nclients: [a, b]\nweights: [1]\n", "1 weights for 2 clients"),
                     ("quorum: 1\n", "quorum"),
                     ("round: r1\nclients: [a]\noption: [k]\n", "KEY=VALUE")):
        cfg_path.write_text(bad)
        with pytest.raises(Exception, match=msg):
            load_coordinator_config(cfg_path)


def test_serve_reads_the_cli_names_from_yaml(family, tmp_path, pki):
    """`serve --config` with the CLI's names, a flag on top: the YAML's round opens, the flag wins."""
    port_file = tmp_path / "port"
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(f"listen: 127.0.0.1:0\nspool: spool\nbase: {family[0]}\nround: r1\nclients: [org-a]\n"
                        "aggregator: local\n")
    proc = subprocess.Popen([sys.executable, "-m", "tiesfed.cli", "coordinator", "serve", "--config", str(cfg_path),
                             "--tls", str(pki.server), "--port-file", str(port_file), "--exit-when-done"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not port_file.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert port_file.exists(), proc.communicate(timeout=5)
        target = f"127.0.0.1:{port_file.read_text().strip()}"
        res = CliRunner().invoke(main, ["coordinator", "status", "--target", target, "--round", "r1", "--tls",
                                        str(pki.client("org-a"))]) if "status" in main.commands[
            "coordinator"].commands else None
        if res is not None:
            assert res.exit_code == 0 and "org-a" in res.output, res.output
        res = CliRunner().invoke(main, ["client", "submit", str(family[0]), str(family[1][0]), "--target", target,
                                        "--round", "r1", "--tls", str(pki.client("org-a")), "-q"])
        assert res.exit_code == 0 and "committed" in res.output, res.output
        res = CliRunner().invoke(main, ["client", "fetch", str(family[0]), "-o", str(tmp_path / "out"), "--target",
                                        target, "--round", "r1", "--tls", str(pki.client("org-a")), "-q",
                                        "--timeout", "60"])
        assert res.exit_code == 0, res.output
        assert proc.wait(timeout=60) == 0
        assert (tmp_path / "spool").is_dir()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
