"""The Ray-sharded coordinator end to end: federated rounds whose accumulators
live in shard actors on a simulated two-node Ray cluster (loopback only), over
real gRPC, compared bit for bit with the local engine's merge.

- Ray is the default aggregator and gives exactly `tiesfed.engine.merge`'s model.
- `tiesfed coordinator serve --ray-address` in a subprocess, its shard actors
  spread over both nodes; every subprocess and its clients speak mutual TLS.
- The coordinator process SIGKILLed mid-round (two contributions committed, a
  third upload in flight, a fetch waiting) and restarted on the same spool and
  port: the round is recovered into fresh shard actors and the clients carry on.
- Shard actors killed mid-round (one while an upload is in flight) are rebuilt
  from the round's replay of the spool.

One Ray cluster (a head and one more node, one CPU each) serves the module;
every coordinator, subprocess and the cluster are stopped by finalizers, also
on failure.
"""

from __future__ import annotations

import json
import os

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # Ray binds and advertises 127.0.0.1
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import grpc  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

ray = pytest.importorskip("ray")
import ray._private.state as ray_state  # noqa: E402

from tests.helpers import start_two_node_cluster, write_family  # noqa: E402
from tiesfed.client.federated import Retry, fetch, submit  # noqa: E402
from tiesfed.coordinator import ray_factory  # noqa: E402
from tiesfed.coordinator.ray_factory import RayAggregatorFactory  # noqa: E402
from tiesfed.coordinator.ray_shards import ShardActorLocal, ShardedAggregator  # noqa: E402
from tiesfed.coordinator.rounds import ParticipantConfig, RoundConfig  # noqa: E402
from tiesfed.coordinator.server import CoordinatorConfig, CoordinatorServer  # noqa: E402
from tiesfed.core.options import MergeConfig, MergeOptions, ModelEntry  # noqa: E402
from tiesfed.engine import merge  # noqa: E402
from tiesfed.federated_merge import federated_merge  # noqa: E402
from tiesfed.io.model_io import ModelReader  # noqa: E402
from tiesfed.protos.v1 import channel_options  # noqa: E402
from tiesfed.protos.v1 import tiesfed_pb2 as pb  # noqa: E402
from tiesfed.protos.v1 import tiesfed_pb2_grpc as pb_grpc  # noqa: E402
from tiesfed.trust.identity import Identity, secure_channel  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SPEC = {
    "embed.weight": (128, 32),
    "layers.0.attn.q.weight": (32, 32),
    "layers.0.mlp.up.weight": (64, 32),
    "layers.0.norm.weight": (32,),
    "lm_head.weight": (128, 32),
    "position_ids": ((1, 32), torch.int64),
}
CLIENTS = ["org-a", "org-b", "org-c"]
FAST = Retry(attempts=6, backoff_s=0.05, max_backoff_s=0.5)
PATIENT = Retry(attempts=200, backoff_s=0.05, max_backoff_s=0.5)  # outlives a coordinator restart
SHARD_ACTOR = ShardActorLocal.__name__  # the class name Ray reports for ShardActor
# exit status of `coordinator serve` after SIGTERM: a clean stop (serve installs its
# handler after ray.init, which would otherwise exit through SystemExit(15))
STOPPED = (0,)


# ----------------------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module")
def cluster():
    """A head and one more node, one CPU each, on loopback; this process is a driver of it."""
    if ray.is_initialized():
        ray.shutdown()
    c = start_two_node_cluster()
    try:
        ray.init(address=c.address, log_to_driver=False)
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        assert {n["NodeManagerAddress"] for n in ray.nodes()} == {"127.0.0.1"}, ray.nodes()
        yield c
    finally:
        ray.shutdown()
        c.shutdown()


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """A sharded base and three fine-tuned models with conflicting task vectors."""
    _, _, base_dir, paths = write_family(tmp_path_factory.mktemp("rayfamily"), 3, seed=11, base_shards=2,
                                         spec=SPEC)
    return base_dir, paths


_ENGINE: dict[str, dict[str, torch.Tensor]] = {}


def engine_model(family, tmp_path_factory, options: MergeOptions = MergeOptions()) -> dict[str, torch.Tensor]:
    """`tiesfed.engine.merge` of the three models (cached per option set)."""
    key = options.model_dump_json()
    if key not in _ENGINE:
        base_dir, paths = family
        out = tmp_path_factory.mktemp("engine")
        cfg = MergeConfig(base_model=str(base_dir), models=[ModelEntry(model=str(p)) for p in paths],
                          options=options)
        merge(cfg, out, progress=False)
        _ENGINE[key] = load_folder(out)
    return _ENGINE[key]


def load_folder(path: Path) -> dict[str, torch.Tensor]:
    with ModelReader(path) as r:
        return {n: r.get(n).clone() for n in r.names}


def assert_identical(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for n, w in want.items():
        assert got[n].dtype == w.dtype and got[n].shape == w.shape, n
        assert torch.equal(got[n], w), f"{n} differs"


def shard_actors(job_id: str | None = None, exclude_job: str | None = None, state: str | None = "ALIVE") -> dict:
    """Shard actors known to the cluster's GCS: actor id -> info (JobID, State, Address.NodeID)."""
    out = {}
    for aid, a in ray_state.actors().items():
        if a["ActorClassName"] != SHARD_ACTOR or (state and a["State"] != state):
            continue
        if (job_id and a["JobID"] != job_id) or (exclude_job and a["JobID"] == exclude_job):
            continue
        out[aid] = a
    return out


def shard_actors_eventually(n: int, exclude_job: str, exclude=(), timeout: float = 60.0) -> dict:
    """`shard_actors(exclude_job=...)` less `exclude`, once there are `n` of them (or at the timeout):
    a coordinator listens before its Ray aggregator is up, and builds its actors in the background."""
    end = time.monotonic() + timeout
    while True:
        found = {a: x for a, x in shard_actors(exclude_job=exclude_job).items() if a not in exclude}
        if len(found) >= n or time.monotonic() > end:
            return found
        time.sleep(0.2)


def wait_dead(actor_ids, timeout: float = 30.0) -> None:
    """Every one of these actors is DEAD in the GCS (none leaked)."""
    end = time.monotonic() + timeout
    left = set(actor_ids)
    while left and time.monotonic() < end:
        left = {a for a in left if ray_state.actors(actor_id=a)["State"] != "DEAD"}
        if left:
            time.sleep(0.1)
    assert not left, f"shard actors still alive: {sorted(left)}"


class Coordinators:
    """`coordinator serve` subprocesses, each in its own process group, serving mutual TLS
    with the session's PKI (tests/conftest.py) and honouring its revocation list."""

    def __init__(self, tmp_path: Path, pki):
        self.tmp_path = tmp_path
        self.pki = pki
        self.procs: list[tuple[subprocess.Popen, Path]] = []

    def start(self, cluster, spool: Path, base: Path, port_file: Path, listen: str = "127.0.0.1:0") -> str:
        """Start one, wait until it listens (after recovering the spool), return its target."""
        port_file.unlink(missing_ok=True)
        log = self.tmp_path / f"coordinator-{len(self.procs)}.log"
        cmd = [
            sys.executable, "-m", "tiesfed.cli", "coordinator", "serve",
            "--ray-address", cluster.address, "--num-shards", "2",
            "--spool", str(spool), "--base", str(base),
            "--round", "r1", "--clients", ",".join(CLIENTS),
            "--listen", listen, "--port-file", str(port_file), "-v",
            "--tls", str(self.pki.server), "--crl", str(self.pki.crl),
        ]
        env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
        with open(log, "wb") as f:
            p = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, start_new_session=True)
        self.procs.append((p, log))
        end = time.monotonic() + 120
        while not port_file.exists():
            if p.poll() is not None:
                raise AssertionError(f"coordinator exited with {p.returncode}:\n{self.log_tail(p)}")
            if time.monotonic() > end:
                raise AssertionError(f"coordinator did not start within 120 s:\n{self.log_tail(p)}")
            time.sleep(0.1)
        return f"127.0.0.1:{int(port_file.read_text())}"

    def log_tail(self, p: subprocess.Popen, n: int = 4000) -> str:
        log = next(lg for q, lg in self.procs if q is p)
        return log.read_text(errors="replace")[-n:]

    def kill(self, p: subprocess.Popen, sig: int = signal.SIGKILL, timeout: float = 30.0) -> int:
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            pass
        return p.wait(timeout)

    def stop_all(self) -> None:
        for p, _ in self.procs:
            if p.poll() is None:
                try:
                    self.kill(p, signal.SIGTERM, timeout=15)
                except subprocess.TimeoutExpired:
                    self.kill(p, signal.SIGKILL)
            try:  # anything left in its group
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


@pytest.fixture
def coordinators(tmp_path, pki):
    c = Coordinators(tmp_path, pki)
    yield c
    c.stop_all()


def upload_status(pki, target: str, client: str) -> pb.UploadStatusReply:
    with secure_channel(target, Identity.load(pki.client(client)), options=channel_options()) as ch:
        return pb_grpc.CoordinatorStub(ch).UploadStatus(
            pb.UploadStatusRequest(round_id="r1"), timeout=30,
            wait_for_ready=True)  # the process-wide subchannel may still be backing off from the restart


def first_event(pki, target: str, client: str = "org-a") -> pb.RoundEvent:
    with secure_channel(target, Identity.load(pki.client(client)), options=channel_options()) as ch:
        stream = pb_grpc.CoordinatorStub(ch).Watch(pb.WatchRequest(round_id="r1"), timeout=30,
                                                   wait_for_ready=True)
        ev = next(iter(stream))
        stream.cancel()
        return ev


def in_thread(fn, *args, **kw):
    """Run fn in a thread; returns (thread, box) with box["result"] or box["error"]."""
    box: dict = {}

    def run():
        try:
            box["result"] = fn(*args, **kw)
        except BaseException as e:  # noqa: BLE001 - re-raised by the test
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, box


def joined(t: threading.Thread, box: dict, timeout: float = 120.0):
    t.join(timeout)
    assert not t.is_alive(), "thread did not finish"
    if "error" in box:
        raise box["error"]
    return box["result"]


# ----------------------------------------------------------------------------- 1. Ray by default == local merge


@pytest.mark.parametrize(
    "opts, how",
    [
        ({}, "factory"),
        ({"election": "count", "disjoint": "max", "k": 30}, "factory"),
        ({"lam": 1.3, "trim": "tensor"}, "default"),
    ],
    ids=["paper-defaults", "count-dis-max", "default-aggregator"],
)
def test_ray_round_equals_local_merge(cluster, family, tmp_path, tmp_path_factory, monkeypatch, opts, how):
    base_dir, paths = family
    options = MergeOptions(**opts)
    cfg = MergeConfig(base_model=str(base_dir), models=[ModelEntry(model=str(p)) for p in paths], options=options)
    made: list[tuple[ShardedAggregator, list[dict], list[str]]] = []

    class Recording(ShardedAggregator):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            made.append((self, ray.get([x.info.remote() for x in self.actors.values()]),
                         [x._actor_id.hex() for x in self.actors.values()]))

    monkeypatch.setattr(ray_factory, "ShardedAggregator", Recording)
    if how == "factory":
        res = federated_merge(cfg, tmp_path / "fed", chunk_bytes=1024,
                              aggregator_factory=RayAggregatorFactory(num_shards=3, num_cpus_per_actor=0.25))
    else:  # no aggregator named: Ray, on the Ray this process is connected to
        res = federated_merge(cfg, tmp_path / "fed", chunk_bytes=1024)
    assert_identical(load_folder(tmp_path / "fed"), engine_model(family, tmp_path_factory, options))
    assert len(res.clients) == 3 and res.download_bytes > 0

    assert len(made) == 1, "the round did not aggregate on Ray shard actors"
    agg, infos, actor_ids = made[0]
    if how == "factory":
        assert sorted(i["shard_id"] for i in infos) == [0, 1, 2]
        assert len({i["node_id"] for i in infos}) == 2, "shard actors not spread over both nodes"
    else:  # a tiny model: the default plan is one shard
        assert len(infos) >= 1
    assert all(i["pid"] != os.getpid() for i in infos)
    # the round released its actors, and left this process's Ray connection alone
    assert agg.actors == {}
    wait_dead(actor_ids)
    assert ray.is_initialized()


# ----------------------------------------------------------------------------- 2. multi-node, coordinator subprocess


def test_coordinator_subprocess_on_multinode_cluster(cluster, family, tmp_path, tmp_path_factory, coordinators, pki):
    base_dir, paths = family
    spool = tmp_path / "spool"
    target = coordinators.start(cluster, spool, base_dir, tmp_path / "port")
    proc = coordinators.procs[-1][0]
    me = ray.get_runtime_context().get_job_id()

    receipts = {CLIENTS[0]: submit(target, "r1", None, base_dir, paths[0], retry=FAST, chunk_bytes=2048,
                                   tls=pki.client(CLIENTS[0]))}
    # the coordinator (another driver of this cluster) folds into 2 shard actors, one per node
    # (it listens before they are up: they may still be starting, the upload spooled meanwhile)
    theirs = shard_actors_eventually(2, exclude_job=me)
    assert len(theirs) == 2, coordinators.log_tail(proc)
    assert len({a["Address"]["NodeID"] for a in theirs.values()}) == 2
    for i, c in enumerate(CLIENTS[1:], 1):
        receipts[c] = submit(target, "r1", None, base_dir, paths[i], retry=FAST, chunk_bytes=2048, tls=pki.client(c))
    assert all(r.attempts == 1 and not r.duplicate for r in receipts.values())

    out = tmp_path / "fetched"
    res = fetch(target, "r1", None, base_dir, out, timeout=120, retry=FAST, tls=pki.client(CLIENTS[1]))
    want = engine_model(family, tmp_path_factory)
    assert_identical(load_folder(out), want)
    # the coordinator's own copy of the merged model (it has the base) too, written by the
    # two shard actors in parallel, several safetensors files (the fallback writes one file)
    model_dir = spool / "rounds" / "r1" / "model"
    assert_identical(load_folder(model_dir), want)
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) >= 2 and all((model_dir / f).is_file() for f in files), index
    assert "model-00001-of-" in " ".join(sorted(files))
    assert (model_dir / "config.json").exists()
    assert "parallel model write failed" not in coordinators.log_tail(proc, 10**7)
    assert res.header["contributors"] == sorted(CLIENTS)
    wait_dead(theirs)  # released at finalization
    assert coordinators.kill(proc, signal.SIGTERM) in STOPPED, coordinators.log_tail(proc)


# ----------------------------------------------------------------------------- 3. coordinator process killed mid-round


def test_coordinator_killed_mid_round_recovers_from_spool(cluster, family, tmp_path, tmp_path_factory, coordinators,
                                                          pki):
    base_dir, paths = family
    spool = tmp_path / "spool"
    port_file = tmp_path / "port"
    target = coordinators.start(cluster, spool, base_dir, port_file)
    first = coordinators.procs[-1][0]
    me = ray.get_runtime_context().get_job_id()

    receipts = {c: submit(target, "r1", c, base_dir, paths[i], retry=FAST, tls=pki.client(c))
                for i, c in enumerate(CLIENTS[:2])}
    old_actors = shard_actors_eventually(2, exclude_job=me)
    assert len(old_actors) == 2, coordinators.log_tail(first)

    # a fetch already waiting, and org-c's upload in flight when the coordinator dies;
    # both retry against the restarted coordinator (same spool, same port)
    fetcher = in_thread(fetch, target, "r1", CLIENTS[0], base_dir, tmp_path / "fetched-early",
                        timeout=180, retry=PATIENT, tls=pki.client(CLIENTS[0]))
    chunk = 256
    mid, killed, go = threading.Event(), threading.Event(), threading.Event()

    def fault(attempt: int, i: int) -> bool:
        if attempt == 0 and i == 12:
            mid.set()
            killed.wait(120)
            return True  # the stream is dead anyway: break it and resume
        if attempt > 0 and i == 0:
            go.wait(120)  # hold the resumed upload until the recovered state was checked
        return False

    uploader = in_thread(submit, target, "r1", CLIENTS[2], base_dir, paths[2], retry=PATIENT,
                         chunk_bytes=chunk, fault=fault, tls=pki.client(CLIENTS[2]))
    try:
        assert mid.wait(60), "the third upload never got going"
        partial = spool / "rounds" / "r1" / "partial" / f"{CLIENTS[2]}.part"
        end = time.monotonic() + 30
        while not (partial.exists() and partial.stat().st_size >= 12 * chunk) and time.monotonic() < end:
            time.sleep(0.01)
        assert partial.stat().st_size >= 12 * chunk, "the coordinator never received the first chunks"

        assert coordinators.kill(first) == -signal.SIGKILL
        killed.set()
        port = int(port_file.read_text())
        target2 = coordinators.start(cluster, spool, base_dir, port_file, listen=f"127.0.0.1:{port}")
        second = coordinators.procs[-1][0]
        assert target2 == target

        # recovered from the spool: both commits, nothing of the half-received upload
        ev = first_event(pki, target)
        assert ev.kind == pb.ROUND_OPENED and ev.committed == 2 and "recovered" in ev.message, ev
        for c, r in receipts.items():
            st = upload_status(pki, target, c)
            assert st.committed and st.committed_sha256 == r.sha256
        st = upload_status(pki, target, CLIENTS[2])
        assert not st.committed and st.committed_offset == 0
        assert not partial.exists()
        # ... into fresh shard actors of the new coordinator; the dead driver's are gone
        new_actors = shard_actors_eventually(2, exclude_job=me, exclude=old_actors)
        assert len(new_actors) == 2, coordinators.log_tail(second)
        assert len({a["JobID"] for a in new_actors.values()} & {a["JobID"] for a in old_actors.values()}) == 0
        wait_dead(old_actors)

        go.set()
        res_c = joined(*uploader)
        assert res_c.attempts >= 2 and not res_c.duplicate
        early = joined(*fetcher, timeout=180)
        want = engine_model(family, tmp_path_factory)
        assert_identical(load_folder(early.out_dir), want)
        late = fetch(target, "r1", CLIENTS[1], base_dir, tmp_path / "fetched-late", timeout=120, retry=FAST,
                     tls=pki.client(CLIENTS[1]))
        assert late.sha256 == early.sha256
        assert_identical(load_folder(late.out_dir), want)
        assert_identical(load_folder(spool / "rounds" / "r1" / "model"), want)
        assert late.header["contributors"] == sorted(CLIENTS)
        assert coordinators.kill(second, signal.SIGTERM) in STOPPED, coordinators.log_tail(second)
    finally:  # never leave the client threads parked in the fault hook
        killed.set()
        go.set()


# ----------------------------------------------------------------------------- 4. shard actor killed mid-round


def test_shard_actors_killed_mid_round(cluster, family, tmp_path, tmp_path_factory):
    base_dir, paths = family
    cfg = CoordinatorConfig(listen="127.0.0.1:0", spool_dir=tmp_path / "spool", base_model=str(base_dir),
                            num_shards=2, num_cpus_per_actor=0.25, max_restarts=2,
                            insecure=True)  # in-process: shard recovery; identity is tested in test_identity.py
    assert cfg.aggregator == "ray"  # the default
    srv = CoordinatorServer(cfg)
    try:
        srv.start()
        assert srv.ray_factory is not None
        rnd = srv.manager.open_round(RoundConfig(
            round_id="r1", participants=[ParticipantConfig(client_id=c) for c in CLIENTS]))
        assert rnd.fold_mode == "arrival"
        agg = rnd.agg
        assert isinstance(agg, ShardedAggregator) and sorted(agg.actors) == [0, 1]
        rebuilt: list[list[int]] = []
        real_recover = agg.recover

        def spy_recover() -> list[int]:
            rebuilt.append(real_recover())
            return rebuilt[-1]

        agg.recover = spy_recover
        submit(srv.target, "r1", CLIENTS[0], base_dir, paths[0], retry=FAST, insecure=True)

        # shard 0 dies while org-b's upload is half folded; rebuild it right there, with
        # org-b's stream paused: the replay must hold org-a plus org-b's folded records
        chunk = 256
        seen: dict = {}

        def fault(attempt: int, i: int) -> bool:
            if attempt or i == 0 or "rebuilt" in seen:
                return False
            end = time.monotonic() + 30
            while time.monotonic() < end:  # until the chunks sent so far have arrived
                s = rnd.sessions.get(CLIENTS[1])
                if s is not None and s.offset == chunk * i:
                    break
                time.sleep(0.005)
            else:
                raise AssertionError("the coordinator never received the first chunks")
            with rnd.lock:
                s = rnd.sessions[CLIENTS[1]]
                if len(s.folded) < 2:  # wait for records of org-b folded into the aggregator
                    return False
                seen["folded"] = len(s.folded)
                victim = agg.actors[0]
                seen["gen"] = ray.get(victim.generation.remote())
                ray.kill(victim, no_restart=False)
                seen["rebuilt"] = agg.recover()
                seen["gen_after"] = ray.get(victim.generation.remote())
                local = ShardActorLocal(0, agg.plan.shards[0], agg.spec, "cpu")
                for name, idx, val, w in rnd.replay():
                    for shard, li, v in agg.plan.split(name, idx, val):
                        if shard == 0:
                            local.fold(li, v, w, 1)
                seen["digest"] = (ray.get(victim.state_digest.remote()), local.state_digest())
            return False

        res_b = submit(srv.target, "r1", CLIENTS[1], base_dir, paths[1], retry=FAST, insecure=True, chunk_bytes=chunk,
                       fault=fault)
        assert res_b.attempts == 1 and "rebuilt" in seen, "the fault hook never ran"
        assert seen["folded"] >= 2 and not res_b.duplicate
        assert seen["rebuilt"] == [0] and seen["gen_after"] != seen["gen"]
        empty = ShardActorLocal(0, agg.plan.shards[0], agg.spec, "cpu").state_digest()
        assert seen["digest"][0] == seen["digest"][1] != empty

        # shard 1 dies with two contributions committed; nobody looks until the
        # finalization barrier, which rebuilds it from the spool
        victim = agg.actors[1]
        ray.kill(victim, no_restart=False)
        submit(srv.target, "r1", CLIENTS[2], base_dir, paths[2], retry=FAST, insecure=True, chunk_bytes=1024)
        out = tmp_path / "fetched"
        fetch(srv.target, "r1", CLIENTS[2], base_dir, out, timeout=120, retry=FAST, insecure=True)
        assert rnd.state == "finalized"
        assert [1] in rebuilt[1:], f"shard 1 was never rebuilt: {rebuilt}"
        want = engine_model(family, tmp_path_factory)
        assert_identical(load_folder(out), want)
        assert_identical(load_folder(rnd.spool.model_dir), want)
        assert agg.actors == {}  # released at finalization
    finally:
        srv.stop(grace=0)
    assert ray.is_initialized()  # the server joined this process's Ray and left it running


# ----------------------------------------------------------------------------- 5. hostile uploads on Ray shards


def test_rejected_hostile_upload_on_ray_shards_leaves_no_trace(cluster, family, tmp_path, tmp_path_factory):
    """The integrity guarantee on Ray shard actors: an upload whose values break the
    float64 sums' exactness is folded on arrival, then refused; the shards are rebuilt
    from the spool and the merge is the local engine's, bit for bit."""
    from tests.test_federated import contribution_bytes, raw_upload
    from tests.test_integrity import HUGE, scaled
    from tiesfed.io.model_io import fingerprint

    base_dir, paths = family
    with ModelReader(base_dir) as r:
        fam = (base_dir, paths, fingerprint(r))
    cfg = CoordinatorConfig(listen="127.0.0.1:0", spool_dir=tmp_path / "spool", base_model=str(base_dir),
                            num_shards=2, num_cpus_per_actor=0.25,
                            insecure=True)  # in-process: integrity on shards; identity: test_identity.py
    srv = CoordinatorServer(cfg)
    try:
        srv.start()
        rnd = srv.manager.open_round(RoundConfig(
            round_id="r1", participants=[ParticipantConfig(client_id=c) for c in CLIENTS], max_abs_value=1e30))
        assert isinstance(rnd.agg, ShardedAggregator) and rnd.fold_mode == "arrival"
        for i, c in enumerate(CLIENTS[:2]):
            submit(srv.target, "r1", c, base_dir, paths[i], retry=FAST, insecure=True)
        hostile = contribution_bytes(fam, 0, mutate=scaled(HUGE, drop_last=True))
        with pytest.raises(grpc.RpcError) as ei:
            raw_upload(srv, "r1", "org-c", hostile, chunk=300)
        assert "ends without 1 tensor" in ei.value.details()
        submit(srv.target, "r1", "org-c", base_dir, paths[2], retry=FAST, insecure=True)
        out = tmp_path / "fetched"
        fetch(srv.target, "r1", "org-a", base_dir, out, timeout=60, retry=FAST, insecure=True)
        assert_identical(load_folder(out), engine_model(family, tmp_path_factory))
    finally:
        srv.stop(grace=0)
