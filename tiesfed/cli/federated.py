"""`tiesfed coordinator ...` and `tiesfed client ...`: the federated commands.

    tiesfed coordinator serve --tls server/ --crl ca/crl.pem --config coordinator.yaml
    tiesfed coordinator serve --tls server/ --spool spool/ --base base/ --round r1 --clients org-a,org-b --option k=20
    tiesfed client submit BASE MODEL --tls org-a/ --target HOST:PORT --round r1
    tiesfed client fetch BASE -o merged/ --tls org-a/ --target HOST:PORT --round r1
    tiesfed coordinator close --tls ops/ --target HOST:PORT --round r1

Identity folders come from `tiesfed pki issue`. `--insecure` (plaintext, ids from
--client-id, admin by --admin-token) is for loopback demos only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import click
import yaml
from pydantic import ValidationError

from tiesfed.cli.common import device_option, flag_message, log_to_stderr, parse_size, parse_weights, target_option
from tiesfed.cli.logs import configure as configure_logging
from tiesfed.core.options import validation_message

TARGET = click.option(
    "--target", envvar="TIESFED_COORDINATOR", required=True, callback=target_option,
    help="coordinator HOST:PORT (env TIESFED_COORDINATOR)",
)
ROUND = click.option("--round", "round_id", required=True, help="round id")
CLIENT_ID = click.option(
    "--client-id", envvar="TIESFED_CLIENT_ID",
    help="this client's id (env TIESFED_CLIENT_ID); with --tls it is the certificate's and may be left out",
)
TLS = click.option("--tls", "tls", envvar="TIESFED_TLS", type=click.Path(exists=True, file_okay=False),
                   help="identity folder (cert.pem, key.pem, ca.pem from `tiesfed pki issue`): mutual TLS "
                   "(env TIESFED_TLS)")
INSECURE = click.option("--insecure", is_flag=True,
                        help="plaintext, no identities: only against a loopback coordinator started --insecure")
SERVER_NAME = click.option("--server-name", help="the name the coordinator's certificate must carry, when it "
                           "is not the host in --target")
ADMIN_TOKEN = click.option("--admin-token", envvar="TIESFED_ADMIN_TOKEN", help="admin token (env TIESFED_ADMIN_TOKEN)")
ADMIN_TOKEN_FILE = click.option(
    "--admin-token-file", type=click.Path(dir_okay=False),
    help="read the admin token from this file, e.g. SPOOL/admin-token, where a coordinator started "
    "without --admin-token writes the one it generated",
)
ENVIRONMENT = click.core.ParameterSource.ENVIRONMENT
#: CoordinatorConfig fields whose `serve` flag has another name (for the flags in error messages).
SERVE_FIELDS = {"abandon_after_s": "abandon_after", "shard_bytes": "shard_size"}
QUIET = click.option("-q", "--quiet", is_flag=True, help="no progress bar")
WAIT = click.option(
    "--wait-for-coordinator", "wait_s", type=click.FloatRange(min=0), default=60.0, show_default=True,
    help="seconds to wait for a coordinator that is not listening yet (0: fail at once)",
)


def _key_values(items, hint: str) -> dict:
    """KEY=VALUE flags as a dict (values read as YAML scalars, dashes in keys as underscores)."""
    out: dict = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise click.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint=hint)
        out[key.strip().replace("-", "_")] = yaml.safe_load(value)
    return out


def _inline_round(round_id, clients, weights, quorum, deadline, late, replace, options) -> dict:
    """A round from command-line flags (the YAML form has every field)."""
    ids = [c for c in clients.replace(",", " ").split() if c]
    if not ids:
        raise click.BadParameter("give at least one client id", param_hint="--clients")
    ws = parse_weights(weights, len(ids))
    opts = _key_values(options, "--option")
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
            click.option("--late-policy", type=click.Choice(["reject", "accept"]), default="reject", show_default=True,
                         help="uploads that start after the deadline: refused, or still folded in"),
            click.option("--replace-policy", type=click.Choice(["replace", "refuse"]), default="replace",
                         show_default=True, help="a client's second upload: replaces its first, or is refused"),
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
@click.option("--tls", "tls_dir", type=click.Path(exists=True, file_okay=False),
              help="server identity folder (`tiesfed pki issue CA --server HOST -o DIR`): mutual TLS, callers "
              "known by their certificates")
@click.option("--crl", type=click.Path(exists=True, dir_okay=False),
              help="the CA's crl.pem: revoked certificates are refused, re-read on change (no restart)")
@click.option("--insecure", is_flag=True, default=None,
              help="plaintext, ids from metadata, admin by token: loopback demos only (prints a warning)")
@ADMIN_TOKEN
@click.option("--max-active-uploads", type=int, help="uploads read at once (bounds memory)")
@click.option("--abandon-after", type=float, help="seconds before an interrupted upload is dropped")
@click.option("--round-config", "round_configs", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="YAML of one round to open (repeatable)")
@_round_options
@click.option("--aggregator", type=click.Choice(["ray", "local", "spill"]),
              help="ray (default): accumulators sharded over Ray actors; local: in this process; spill: in "
              "this process a block at a time, folds spilled to <spool>/spill (memory flat in the model size)")
@click.option("--ray-address", help="join this Ray cluster (default: start a local Ray)")
@click.option("--num-shards", type=int, help="shard actors per round (default: one per CPU, or GPU)")
@click.option("--num-gpus-per-actor", type=float, help="GPUs per shard actor (fractions allowed)")
@click.option("--actor-memory", help="memory budget of one shard actor, e.g. 3GB: a round gets as many actors "
              "as its accumulators need (default: the cluster's memory per CPU, at most 4 GiB)")
@click.option("--sum-dtype", type=click.Choice(["float64", "float32"]),
              help="accumulator sums: float64 (default, exact) or float32 (8 bytes a parameter less; the merge "
              "then depends on the commit order within float32 rounding)")
@click.option("--publish-first", is_flag=True, default=None,
              help="finalize (clients fetch) once the merged stream is signed; write this coordinator's model "
              "copy after (a failed copy no longer fails the round)")
@click.option("--secure-aggregation", is_flag=True, help="every round this serve opens is a secure round: the "
              "coordinator learns only the sums (docs/secure-aggregation.md); clients follow the round spec")
@click.option("--secagg", "secagg", multiple=True, help="with --secure-aggregation: a setting KEY=VALUE of its "
              "rounds (repeatable): threshold, bound, frac_bits, max_clients, min_release, phase_s, min_rate")
@click.option("--port-file", type=click.Path(dir_okay=False), help="write the bound port here (for scripts)")
@click.option("--exit-when-done", is_flag=True,
              help="exit once every round is finished and every participant fetched the merge")
@click.option("--metrics-port", type=click.IntRange(0, 65535), help="serve Prometheus metrics on this port "
              "(0: a free one, logged)")
@click.option("--metrics-host", help="address of the metrics endpoint (default 127.0.0.1)")
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text", show_default=True,
              help="log lines on stderr: text, or one JSON object a line (time, level, logger, message, round, ...)")
@click.option("-v", "--verbose", is_flag=True, help="debug logging (round events are logged at INFO anyway)")
def serve(config_path, listen, spool_dir, base_model, shard_size, tls_dir, crl, insecure, admin_token,
          max_active_uploads, abandon_after, round_configs, round_id, clients, weights, quorum, deadline, late_policy, replace_policy, options,
          aggregator, ray_address, num_shards, num_gpus_per_actor, actor_memory, sum_dtype, publish_first, port_file,
          exit_when_done, metrics_port, metrics_host, log_format, verbose, secure_aggregation=False,
          secagg=()) -> None:
    """Serve federated rounds over gRPC until interrupted (with --tls, or else --insecure on loopback)."""
    from tiesfed.coordinator.rounds import RoundConfig, RoundError
    from tiesfed.coordinator.server import CoordinatorConfig, load_coordinator_config
    from tiesfed.coordinator.server import serve as run
    from tiesfed.trust import TrustError

    if tls_dir and click.get_current_context().get_parameter_source("admin_token") == ENVIRONMENT:
        admin_token = None  # the token is insecure mode's; a stray TIESFED_ADMIN_TOKEN is not an error

    configure_logging(log_format, verbose)
    try:
        cfg = load_coordinator_config(config_path) if config_path else CoordinatorConfig()
        upd: dict = {}
        for key, value in (("listen", listen), ("spool_dir", spool_dir), ("base_model", base_model),
                           ("tls_dir", tls_dir), ("crl", crl), ("insecure", insecure), ("admin_token", admin_token), ("max_active_uploads", max_active_uploads),
                           ("abandon_after_s", abandon_after), ("aggregator", aggregator),
                           ("ray_address", ray_address), ("num_shards", num_shards),
                           ("num_gpus_per_actor", num_gpus_per_actor), ("metrics_port", metrics_port),
                           ("metrics_host", metrics_host), ("sum_dtype", sum_dtype),
                           ("publish_first", publish_first)):
            if value is not None:
                upd[key] = Path(value) if key in ("spool_dir", "tls_dir", "crl") else value
        if shard_size:
            upd["shard_bytes"] = parse_size(shard_size)
        if actor_memory:
            upd["actor_memory"] = parse_size(actor_memory)
        rounds = list(cfg.rounds)
        for path in round_configs:
            rounds.append(RoundConfig.model_validate(yaml.safe_load(Path(path).read_text())))
        if round_id or clients:
            if not (round_id and clients):
                raise click.UsageError("--round and --clients go together")
            rounds.append(RoundConfig.model_validate(
                _inline_round(round_id, clients, weights, quorum, deadline, late_policy, replace_policy, options)
            ))
        if secagg and not secure_aggregation:
            raise click.UsageError("--secagg sets a secure round's settings: give --secure-aggregation too")
        if secure_aggregation:
            given = _key_values(secagg, "--secagg")
            rounds = [RoundConfig.model_validate({
                **r.model_dump(), "secure_aggregation": True,
                "secagg": {**(r.secagg.model_dump(exclude_unset=True) if r.secagg else {}), **given} or None,
            }) for r in rounds]
        upd["rounds"] = rounds
        cfg = CoordinatorConfig.model_validate({**cfg.model_dump(), **upd})
    except ValidationError as e:
        raise click.UsageError(flag_message(e, click.get_current_context(), SERVE_FIELDS)) from None
    try:
        run(cfg, port_file=port_file, exit_when_done=exit_when_done)
    except (RoundError, ValueError, OSError, TrustError) as e:
        raise click.ClickException(str(e)) from None


def _admin_token(admin_token: Optional[str], admin_token_file: Optional[str]) -> str:
    """The token of --admin-token or --admin-token-file (the file wins over the env variable)."""
    from tiesfed.coordinator.admin import read_token_file

    src = click.get_current_context().get_parameter_source("admin_token")
    if admin_token is not None and admin_token_file and src != ENVIRONMENT:
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


def _admin_connection(target: str, tls: Optional[str], insecure: bool, server_name: Optional[str],
                      admin_token: Optional[str], admin_token_file: Optional[str]):
    """(channel, stub, metadata) for an admin call: mutual TLS with an admin identity, or
    plaintext with the token (--insecure, a loopback coordinator)."""
    import grpc

    from tiesfed.protos.v1 import ADMIN_TOKEN_KEY, channel_options
    from tiesfed.protos.v1 import tiesfed_pb2_grpc as pb_grpc
    from tiesfed.trust import TrustError
    from tiesfed.trust.identity import Identity, secure_channel

    if bool(tls) == insecure:
        raise click.UsageError("give --tls ADMIN_DIR (an admin identity from `tiesfed pki issue CA --admin NAME`) "
                               "or --insecure with --admin-token/--admin-token-file" + (", not both" if tls else ""))
    if insecure:
        if server_name:
            raise click.UsageError("--server-name checks the coordinator's certificate: it needs --tls")
        token = _admin_token(admin_token, admin_token_file)
        channel = grpc.insecure_channel(target, options=channel_options())
        return channel, pb_grpc.CoordinatorStub(channel), ((ADMIN_TOKEN_KEY, token),)
    ctx = click.get_current_context()
    if admin_token_file or (admin_token is not None and ctx.get_parameter_source("admin_token") != ENVIRONMENT):
        raise click.UsageError("--admin-token/--admin-token-file are for --insecure: with --tls the admin "
                               "certificate is the credential")
    try:
        identity = Identity.load(tls)  # type: ignore[arg-type]
    except TrustError as e:
        raise click.BadParameter(str(e), param_hint="--tls") from None
    if identity.role != "admin":
        raise click.BadParameter(f"{tls} holds a {identity.role} certificate; admin calls need an admin one "
                                 "(`tiesfed pki issue CA --admin NAME -o DIR`)", param_hint="--tls")
    channel = secure_channel(target, identity, server_name=server_name, options=channel_options())
    return channel, pb_grpc.CoordinatorStub(channel), ()


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
@TLS
@INSECURE
@SERVER_NAME
@ADMIN_TOKEN
@ADMIN_TOKEN_FILE
@click.option("--round-config", "round_config", type=click.Path(exists=True, dir_okay=False),
              help="YAML of the round")
@_round_options
@click.option("--secure-aggregation", is_flag=True, help="a secure round: the coordinator learns only the sums "
              "(docs/secure-aggregation.md); clients follow the round spec")
@click.option("--secagg", "secagg", multiple=True, help="a secure round's setting KEY=VALUE (repeatable): "
              "threshold, bound, frac_bits, max_clients, min_release, phase_s, min_rate; e.g. threshold=3")
def open_round(target, tls, insecure, server_name, admin_token, admin_token_file, round_config, round_id, clients,
               weights, quorum, deadline, late_policy, replace_policy, options, secure_aggregation, secagg) -> None:
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
        if secure_aggregation or secagg:
            settings = {**(rc.secagg.model_dump(exclude_unset=True) if rc.secagg else {}),
                        **_key_values(secagg, "--secagg")}
            rc = RoundConfig.model_validate({**rc.model_dump(),
                                             "secure_aggregation": secure_aggregation or rc.secure_aggregation,
                                             "secagg": settings or None})
    except ValidationError as e:
        raise click.UsageError(validation_message(e)) from None
    channel, stub, md = _admin_connection(target, tls, insecure, server_name, admin_token, admin_token_file)
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
        max_abs_value=rc.max_abs_value if "max_abs_value" in rc.model_fields_set else 0.0,  # else the server's
        secure_aggregation=rc.secure_aggregation,
        secagg_json=rc.secagg.model_dump_json(exclude_unset=True) if rc.secagg else "",
    )
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
@TLS
@INSECURE
@SERVER_NAME
@ADMIN_TOKEN
@ADMIN_TOKEN_FILE
@click.option("--abort", is_flag=True, help="fail the round instead of finalizing it")
def close_round(target, round_id, tls, insecure, server_name, admin_token, admin_token_file, abort) -> None:
    """Finalize a round now (its quorum must be met), or abort it."""
    import grpc

    from tiesfed.protos.v1 import tiesfed_pb2 as pb

    channel, stub, md = _admin_connection(target, tls, insecure, server_name, admin_token, admin_token_file)
    with channel:
        try:
            st = stub.CloseRound(pb.CloseRoundRequest(round_id=round_id, abort=abort), metadata=md, timeout=3600)
        except grpc.RpcError as e:
            raise click.ClickException(f"{e.code().name}: {e.details()}") from None
    click.echo(_status_text(st))


# ----------------------------------------------------------------------------- client


def _transport(tls: Optional[str], insecure: bool, server_name: Optional[str], client_id: Optional[str]) -> dict:
    """The client's transport flags, checked here so the errors name them."""
    if bool(tls) == insecure:
        raise click.UsageError("give --tls IDENTITY_DIR (mutual TLS; the client id is the certificate's) or "
                               "--insecure with --client-id (plaintext, loopback demos)" + (", not both" if tls else ""))
    if insecure and not client_id:
        raise click.UsageError("--insecure needs --client-id (with --tls the certificate names the client)")
    if insecure and server_name:
        raise click.UsageError("--server-name checks the coordinator's certificate: it needs --tls")
    return {"tls": tls, "insecure": insecure, "server_name": server_name}


THREADS = click.option(
    "--threads", type=click.IntRange(min=1), default=1, show_default=True,
    help="torch threads for the passes over the model: they are memory-bound, so more threads mostly spin "
         "(measured on 2 shared cores: 1 thread used 40% less CPU and less wall time than 2)")


def _set_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


@click.group("client")
def client() -> None:
    """Take part in a federated merge: submit a contribution, fetch the merged model."""


@client.command("submit")
@click.argument("base", type=click.Path(exists=True))
@click.argument("model", type=click.Path(exists=True))
@TARGET
@ROUND
@TLS
@INSECURE
@SERVER_NAME
@CLIENT_ID
@click.option("--device", default="cpu", show_default=True, callback=device_option,
              help="where to trim: cpu, cuda, cuda:N or mps")
@click.option("--chunk-size", default="1MiB", show_default=True, help="upload chunk size (at most 4MiB)")
@click.option("--retries", type=int, default=8, show_default=True,
              help="attempts after a broken connection; an upload counts the breaks in a row after which the "
              "coordinator held no more of it")
@click.option("--max-memory", help="memory budget, e.g. 4GB (default: half the machine's); a tensor larger than "
              "the block it allows is read, trimmed and sent in blocks, with the same result")
@click.option("--allow-architecture-mismatch", is_flag=True,
              help="upload although MODEL's config.json names another architecture than BASE's (e.g. model_type, "
              "hidden_size); the error without it lists what differs")
@click.option("--vocab", type=click.Choice(["base"]),
              help="base: a MODEL that appended tokens after BASE's (embeddings resized) is read at BASE's rows, "
              "its added tokens dropped (mergekit's tokenizer_source: base)")
@THREADS
@click.option("--json", "as_json", is_flag=True, help="print the result as JSON")
@WAIT
@QUIET
def submit_cmd(base, model, target, round_id, tls, insecure, server_name, client_id, device, chunk_size, retries,
               max_memory, allow_architecture_mismatch, vocab, threads, as_json, wait_s, quiet) -> None:
    """Trim MODEL's task vector against BASE and upload it to the round."""
    from tiesfed.client.federated import FederatedError, Retry, submit
    from tiesfed.io.model_io import ModelError
    from tiesfed.trust import TrustError

    log_to_stderr()  # waits and retries (an unreachable --target) are shown, not silent
    _set_threads(threads)

    try:
        res = submit(target, round_id, client_id, base, model, device=device, chunk_bytes=parse_size(chunk_size),
                     retry=Retry(attempts=retries), progress=not quiet, wait_for_coordinator=wait_s,
                     max_memory=parse_size(max_memory) if max_memory else None,
                     allow_architecture_mismatch=allow_architecture_mismatch, vocab=vocab,
                     **_transport(tls, insecure, server_name, client_id))
    except (FederatedError, ModelError, ValueError, TrustError) as e:
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
@TLS
@INSECURE
@SERVER_NAME
@CLIENT_ID
@click.option("--timeout", type=float, help="seconds to wait for the round to finalize (default: forever)")
@click.option("--shard-size", default="5GB", show_default=True, help="output shard size")
@click.option("--retries", type=int, default=8, show_default=True, help="attempts after a broken connection")
@click.option("--keep-merged", is_flag=True, help="keep the merged task vector as OUT/merged_task_vector.tfs")
@click.option("--overwrite", is_flag=True, help="write into a non-empty output folder, replacing its weights")
@click.option("--max-memory", help="memory budget, e.g. 4GB (default: half the machine's); a tensor of the base "
              "larger than the block it allows is applied and written in blocks, with the same result")
@THREADS
@WAIT
@QUIET
def fetch_cmd(base, out_dir, target, round_id, tls, insecure, server_name, client_id, timeout, shard_size, retries,
              keep_merged, overwrite, max_memory, threads, wait_s, quiet) -> None:
    """Wait for the round, download the merged task vector and apply it to BASE."""
    from tiesfed.client.federated import FederatedError, Retry, fetch
    from tiesfed.io.model_io import ModelError
    from tiesfed.trust import TrustError

    log_to_stderr()  # waits and retries (an unreachable --target) are shown, not silent
    _set_threads(threads)

    try:
        res = fetch(target, round_id, client_id, base, out_dir, timeout=timeout, shard_bytes=parse_size(shard_size),
                    retry=Retry(attempts=retries), progress=not quiet, keep_merged=keep_merged, overwrite=overwrite,
                    wait_for_coordinator=wait_s, max_memory=parse_size(max_memory) if max_memory else None,
                    **_transport(tls, insecure, server_name, client_id))
    except (FederatedError, ModelError, ValueError, TimeoutError, TrustError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"merged model of round {round_id} -> {res.out_dir} ({res.total_bytes:,} bytes downloaded, "
               f"sha256 {res.sha256[:16]}…, λ={res.header.get('lambda')}, {res.seconds:.1f} s)")
    if res.provenance is None:
        click.echo("unverified: plaintext round (--insecure), no signatures", err=True)
        return
    folded = res.provenance["contributions"]
    click.echo(f"verified: the coordinator's signature over the merge and its {len(folded)} signed "
               "contribution(s): " + ", ".join(f"{c['client_id']} ({c['sha256'][:12]}…)" for c in folded))


def register(main_group: click.Group) -> None:
    """Add the federated command groups to the `tiesfed` CLI."""
    from tiesfed.cli.audit import audit  # offline: `tiesfed coordinator audit --spool S --round R`

    coordinator.add_command(audit)
    from tiesfed.cli.status import status  # `tiesfed coordinator status --target T --round R`: a round's progress
    coordinator.add_command(status)
    main_group.add_command(coordinator)
    main_group.add_command(client)
