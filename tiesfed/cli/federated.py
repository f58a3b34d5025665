"""`tiesfed coordinator ...` and `tiesfed client ...`: the federated commands.

    tiesfed coordinator serve --config coordinator.yaml
    tiesfed coordinator serve --spool spool/ --base base/ --round r1 --clients org-a,org-b,org-c --option k=20
    tiesfed client submit BASE MODEL --target HOST:PORT --round r1 --client-id org-a
    tiesfed client fetch BASE -o merged/ --target HOST:PORT --round r1 --client-id org-a
    tiesfed coordinator close --target HOST:PORT --round r1 --admin-token-file spool/admin-token
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import click
import yaml
from pydantic import ValidationError

from tiesfed.cli.common import parse_size, parse_weights
from tiesfed.core.options import validation_message

TARGET = click.option(
    "--target", envvar="TIESFED_COORDINATOR", required=True, help="coordinator host:port (env TIESFED_COORDINATOR)"
)
ROUND = click.option("--round", "round_id", required=True, help="round id")
CLIENT_ID = click.option(
    "--client-id", envvar="TIESFED_CLIENT_ID", required=True, help="this client's id (env TIESFED_CLIENT_ID)"
)
ADMIN_TOKEN = click.option("--admin-token", envvar="TIESFED_ADMIN_TOKEN", help="admin token (env TIESFED_ADMIN_TOKEN)")
ADMIN_TOKEN_FILE = click.option(
    "--admin-token-file", type=click.Path(dir_okay=False),
    help="read the admin token from this file, e.g. SPOOL/admin-token, where a coordinator started "
    "without --admin-token writes the one it generated",
)
QUIET = click.option("-q", "--quiet", is_flag=True, help="no progress bar")
WAIT = click.option(
    "--wait-for-coordinator", "wait_s", type=click.FloatRange(min=0), default=60.0, show_default=True,
    help="seconds to wait for a coordinator that is not listening yet (0: fail at once)",
)


def _inline_round(round_id, clients, weights, quorum, deadline, late, replace, options) -> dict:
    """A round from command-line flags (the YAML form has every field)."""
    ids = [c for c in clients.replace(",", " ").split() if c]
    if not ids:
        raise click.BadParameter("give at least one client id", param_hint="--clients")
    ws = parse_weights(weights, len(ids))
    opts: dict = {}
    for item in options:
        key, sep, value = item.partition("=")
        if not sep:
            raise click.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint="--option")
        opts[key.strip().replace("-", "_")] = yaml.safe_load(value)
    return {
        "round_id": round_id,
        "participants": [{"client_id": c, "weight": w} for c, w in zip(ids, ws)],
        "options": opts,
        "quorum": quorum,
        "deadline_s": deadline,
        "late_policy": late,
        "replace_policy": replace,
    }


def _round_options(f):
    for deco in reversed(
        [
            click.option("--round", "round_id", help="open this round (with --clients)"),
            click.option("--clients", help="allowlisted client ids, comma separated"),
            click.option("--weights", help="one weight per client, comma separated"),
            click.option("--quorum", type=int, help="contributions needed (default: every client)"),
            click.option("--deadline", type=float, help="seconds from opening until the deadline"),
            click.option("--late-policy", type=click.Choice(["reject", "accept"]), default="reject", show_default=True),
            click.option("--replace-policy", type=click.Choice(["replace", "refuse"]), default="replace",
                         show_default=True),
            click.option("--option", "options", multiple=True,
                         help="merge option KEY=VALUE (repeatable), e.g. k=20, lambda=1.2, method=ties"),
        ]
    ):
        f = deco(f)
    return f


# ----------------------------------------------------------------------------- coordinator


@click.group("coordinator")
def coordinator() -> None:
    """Run a federated merge coordinator, or administer its rounds."""


@coordinator.command("serve")
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False), help="coordinator YAML")
@click.option("--listen", help="host:port to bind (default 127.0.0.1:50051; port 0 picks one)")
@click.option("--spool", "spool_dir", type=click.Path(file_okay=False), help="durable spool folder")
@click.option("--base", "base_model", type=click.Path(exists=True), help="base model: manifest, fingerprint and the "
              "full merged model")
@click.option("--shard-size", help="shard size of the merged model folder, e.g. 5GB")
@ADMIN_TOKEN
@click.option("--max-active-uploads", type=int, help="uploads read at once (bounds memory)")
@click.option("--abandon-after", type=float, help="seconds before an interrupted upload is dropped")
@click.option("--round-config", "round_configs", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="YAML of one round to open (repeatable)")
@_round_options
@click.option("--aggregator", type=click.Choice(["ray", "local"]),
              help="ray (default): accumulators sharded over Ray actors; local: in this process")
@click.option("--ray-address", help="join this Ray cluster (default: start a local Ray)")
@click.option("--num-shards", type=int, help="shard actors per round (default: one per CPU, or GPU)")
@click.option("--num-gpus-per-actor", type=float, help="GPUs per shard actor (fractions allowed)")
@click.option("--port-file", type=click.Path(dir_okay=False), help="write the bound port here (for scripts)")
@click.option("--exit-when-done", is_flag=True,
              help="exit once every round is finished and every participant fetched the merge")
@click.option("-v", "--verbose", is_flag=True, help="log round events")
def serve(config_path, listen, spool_dir, base_model, shard_size, admin_token, max_active_uploads, abandon_after,
          round_configs, round_id, clients, weights, quorum, deadline, late_policy, replace_policy, options,
          aggregator, ray_address, num_shards, num_gpus_per_actor, port_file, exit_when_done, verbose) -> None:
    """Serve federated rounds over gRPC until interrupted."""
    from tiesfed.coordinator.rounds import RoundConfig, RoundError
    from tiesfed.coordinator.server import CoordinatorConfig, load_coordinator_config
    from tiesfed.coordinator.server import serve as run

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(asctime)s %(message)s")
    try:
        cfg = load_coordinator_config(config_path) if config_path else CoordinatorConfig()
        upd: dict = {}
        for key, value in (("listen", listen), ("spool_dir", spool_dir), ("base_model", base_model),
                           ("admin_token", admin_token), ("max_active_uploads", max_active_uploads),
                           ("abandon_after_s", abandon_after), ("aggregator", aggregator),
                           ("ray_address", ray_address), ("num_shards", num_shards),
                           ("num_gpus_per_actor", num_gpus_per_actor)):
            if value is not None:
                upd[key] = Path(value) if key == "spool_dir" else value
        if shard_size:
            upd["shard_bytes"] = parse_size(shard_size)
        rounds = list(cfg.rounds)
        for path in round_configs:
            rounds.append(RoundConfig.model_validate(yaml.safe_load(Path(path).read_text())))
        if round_id or clients:
            if not (round_id and clients):
                raise click.UsageError("--round and --clients go together")
            rounds.append(RoundConfig.model_validate(
                _inline_round(round_id, clients, weights, quorum, deadline, late_policy, replace_policy, options)
            ))
        upd["rounds"] = rounds
        cfg = CoordinatorConfig.model_validate({**cfg.model_dump(), **upd})
    except ValidationError as e:
        raise click.UsageError(validation_message(e)) from None
    try:
        run(cfg, port_file=port_file, exit_when_done=exit_when_done)
    except (RoundError, ValueError, OSError) as e:
        raise click.ClickException(str(e)) from None


def _admin_token(admin_token: Optional[str], admin_token_file: Optional[str]) -> str:
    """The token of --admin-token or --admin-token-file (the file wins over the env variable)."""
    from tiesfed.coordinator.admin import read_token_file

    src = click.get_current_context().get_parameter_source("admin_token")
    if admin_token is not None and admin_token_file and src != click.core.ParameterSource.ENVIRONMENT:
        raise click.UsageError("give --admin-token or --admin-token-file, not both")
    if admin_token_file:
        try:
            return read_token_file(admin_token_file)
        except ValueError as e:
            raise click.BadParameter(str(e).removeprefix("--admin-token-file: "),
                                     param_hint="--admin-token-file") from None
    if admin_token is None:
        raise click.UsageError("admin calls need the coordinator's token: give --admin-token, or "
                               "--admin-token-file SPOOL/admin-token for the one it generated")
    if not admin_token.strip():
        raise click.BadParameter("is empty", param_hint="--admin-token")
    return admin_token


def _admin_connection(target: str, admin_token: str):
    import grpc

    from tiesfed.protos.v1 import ADMIN_TOKEN_KEY, channel_options
    from tiesfed.protos.v1 import tiesfed_pb2_grpc as pb_grpc

    channel = grpc.insecure_channel(target, options=channel_options())
    return channel, pb_grpc.CoordinatorStub(channel), ((ADMIN_TOKEN_KEY, admin_token),)


def _status_text(st) -> str:
    from tiesfed.protos.v1 import tiesfed_pb2 as pb

    state = pb.RoundState.Name(st.state).removeprefix("ROUND_STATE_").lower()
    lines = [f"round {st.round_id}: {state}, {len(st.committed_clients)}/{st.expected} committed "
             f"(quorum {st.quorum})"]
    if st.merged_sha256:
        lines.append(f"merged task vector: {st.merged_bytes:,} bytes, sha256 {st.merged_sha256}")
    if st.message:
        lines.append(st.message)
    return "\n".join(lines)


@coordinator.command("open")
@TARGET
@ADMIN_TOKEN
@ADMIN_TOKEN_FILE
@click.option("--round-config", "round_config", type=click.Path(exists=True, dir_okay=False),
              help="YAML of the round")
@_round_options
def open_round(target, admin_token, admin_token_file, round_config, round_id, clients, weights, quorum, deadline, late_policy,
               replace_policy, options) -> None:
    """Open a round on a running coordinator (its base gives manifest and fingerprint)."""
    import grpc

    from tiesfed.coordinator.rounds import RoundConfig
    from tiesfed.coordinator.service import LATE, REPLACE
    from tiesfed.protos.v1 import tiesfed_pb2 as pb

    try:
        if round_config:
            rc = RoundConfig.model_validate(yaml.safe_load(Path(round_config).read_text()))
        elif round_id and clients:
            rc = RoundConfig.model_validate(
                _inline_round(round_id, clients, weights, quorum, deadline, late_policy, replace_policy, options)
            )
        else:
            raise click.UsageError("give --round-config, or --round and --clients")
    except ValidationError as e:
        raise click.UsageError(validation_message(e)) from None
    token = _admin_token(admin_token, admin_token_file)
    req = pb.OpenRoundRequest(
        round_id=rc.round_id,
        options_json=rc.options.model_dump_json(by_alias=True),
        participants=[pb.Participant(client_id=p.client_id, weight=p.weight, density=p.density,
                                     model_key=p.model_key or "") for p in rc.participants],
        quorum=rc.quorum or 0,
        deadline_unix=rc.deadline_unix or 0.0,
        deadline_seconds=rc.deadline_s or 0.0,
        late_policy=LATE[rc.late_policy],
        replace_policy=REPLACE[rc.replace_policy],
        base_fingerprint=rc.base_fingerprint or "",
        manifest=[pb.TensorSpec(name=t.name, shape=list(t.shape), dtype=t.dtype) for t in rc.manifest or []],
    )
    channel, stub, md = _admin_connection(target, token)
    with channel:
        try:
            spec = stub.OpenRound(req, metadata=md, timeout=600)
        except grpc.RpcError as e:
            raise click.ClickException(f"{e.code().name}: {e.details()}") from None
    click.echo(f"round {spec.round_id} open: {len(spec.participants)} participants, quorum {spec.quorum}, "
               f"{len(spec.manifest)} tensors, base {spec.base_fingerprint}")


@coordinator.command("close")
@TARGET
@ROUND
@ADMIN_TOKEN
@ADMIN_TOKEN_FILE
@click.option("--abort", is_flag=True, help="fail the round instead of finalizing it")
def close_round(target, round_id, admin_token, admin_token_file, abort) -> None:
    """Finalize a round now (its quorum must be met), or abort it."""
    import grpc

    from tiesfed.protos.v1 import tiesfed_pb2 as pb

    channel, stub, md = _admin_connection(target, _admin_token(admin_token, admin_token_file))
    with channel:
        try:
            st = stub.CloseRound(pb.CloseRoundRequest(round_id=round_id, abort=abort), metadata=md, timeout=3600)
        except grpc.RpcError as e:
            raise click.ClickException(f"{e.code().name}: {e.details()}") from None
    click.echo(_status_text(st))


# ----------------------------------------------------------------------------- client


@click.group("client")
def client() -> None:
    """Take part in a federated merge: submit a contribution, fetch the merged model."""


@client.command("submit")
@click.argument("base", type=click.Path(exists=True))
@click.argument("model", type=click.Path(exists=True))
@TARGET
@ROUND
@CLIENT_ID
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda (trimming)")
@click.option("--chunk-size", default="1MiB", show_default=True, help="upload chunk size (at most 4MiB)")
@click.option("--retries", type=int, default=8, show_default=True, help="attempts after a broken connection")
@click.option("--json", "as_json", is_flag=True, help="print the result as JSON")
@WAIT
@QUIET
def submit_cmd(base, model, target, round_id, client_id, device, chunk_size, retries, as_json, wait_s, quiet) -> None:
    """Trim MODEL's task vector against BASE and upload it to the round."""
    from tiesfed.client.federated import FederatedError, Retry, submit
    from tiesfed.io.model_io import ModelError

    try:
        res = submit(target, round_id, client_id, base, model, device=device, chunk_bytes=parse_size(chunk_size),
                     retry=Retry(attempts=retries), progress=not quiet, wait_for_coordinator=wait_s)
    except (FederatedError, ModelError, ValueError) as e:
        raise click.ClickException(str(e)) from None
    if as_json:
        click.echo(json.dumps({
            "round_id": res.round_id, "client_id": res.client_id, "sha256": res.sha256, "bytes": res.bytes,
            "bytes_sent": res.bytes_sent, "nnz": res.nnz, "attempts": res.attempts, "duplicate": res.duplicate,
            "replaced": res.replaced, "density": res.stats.density, "kept_norm_share": res.stats.kept_norm_share,
            "seconds": res.seconds,
        }))
        return
    what = "duplicate (already committed)" if res.duplicate else ("replaced" if res.replaced else "committed")
    click.echo(
        f"{what}: {res.bytes:,} bytes, {res.nnz:,} nonzeros ({100 * res.stats.density:.1f}% kept, "
        f"{100 * res.stats.kept_norm_share:.1f}% of the task-vector norm), sha256 {res.sha256[:16]}…, "
        f"{res.attempts} attempt(s), {res.seconds:.1f} s"
    )


@client.command("fetch")
@click.argument("base", type=click.Path(exists=True))
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False), help="output folder")
@TARGET
@ROUND
@CLIENT_ID
@click.option("--timeout", type=float, help="seconds to wait for the round to finalize (default: forever)")
@click.option("--shard-size", default="5GB", show_default=True, help="output shard size")
@click.option("--retries", type=int, default=8, show_default=True, help="attempts after a broken connection")
@click.option("--keep-merged", is_flag=True, help="keep the merged task vector as OUT/merged_task_vector.tfs")
@WAIT
@QUIET
def fetch_cmd(base, out_dir, target, round_id, client_id, timeout, shard_size, retries, keep_merged, wait_s,
              quiet) -> None:
    """Wait for the round, download the merged task vector and apply it to BASE."""
    from tiesfed.client.federated import FederatedError, Retry, fetch
    from tiesfed.io.model_io import ModelError

    try:
        res = fetch(target, round_id, client_id, base, out_dir, timeout=timeout, shard_bytes=parse_size(shard_size),
                    retry=Retry(attempts=retries), progress=not quiet, keep_merged=keep_merged,
                    wait_for_coordinator=wait_s)
    except (FederatedError, ModelError, ValueError, TimeoutError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"merged model of round {round_id} -> {res.out_dir} ({res.total_bytes:,} bytes downloaded, "
               f"sha256 {res.sha256[:16]}…, λ={res.header.get('lambda')}, {res.seconds:.1f} s)")


def register(main_group: click.Group) -> None:
    """Add the federated command groups to the `tiesfed` CLI."""
    main_group.add_command(coordinator)
    main_group.add_command(client)
