#!/usr/bin/env bash
# A real multi-process tiesfed deployment on loopback, checked bit for bit.
#
#   deploy/local/run.sh [WORKDIR]        (KEEP=1 keeps WORKDIR and its logs)
#
# In a fresh temp dir (or WORKDIR, which must be empty or absent):
#   1. a small model family (a base + 3 fine-tunes, safetensors) and a PKI (`tiesfed pki`): a
#      CA, a server identity for 127.0.0.1/localhost, clients org-a, org-b, org-c;
#   2. three `tiesfed client submit` processes, started first: they wait for a coordinator
#      that is not there yet (`--wait-for-coordinator`); `tiesfed merge` of the same models
#      with the same options runs meanwhile;
#   3. a Ray cluster of two nodes (`ray start --head`, then a worker node joining it), with
#      its own temp dir, explicit free ports, one CPU per node, bound to 127.0.0.1, and a Ray
#      auth token of its own (not ~/.ray/auth_token);
#   4. once every client says it is waiting, `tiesfed coordinator serve --ray-address ...
#      --tls ... --crl ...`; the three submits must exit 0; then one `tiesfed client fetch`;
#      every socket any of these processes listens on must be loopback;
#   5. the fetched model, the model the coordinator's shard actors wrote into the spool and
#      the local merge must be equal bit for bit (every tensor, dtype and shape);
#   6. on exit, also on failure: every process it started is stopped by PID (never `ray stop`,
#      which would stop other Ray instances on the machine): its children by their $!, Ray's
#      daemons as recorded after `ray start` and found again by the temp dir or GCS address,
#      with all their descendants (agents and workers retitle themselves `ray::...`).
# Exits non-zero on any failure or difference; prints a summary ending 'bit-identical: yes'.
#
# Environment: PYTHON (default python3), TIESFED (default tiesfed), RAY (default ray),
# KEEP=1 (keep the work dir), FAMILY_DTYPE (the models' matrices: float32, the default, or
# bfloat16 / float16).
set -Eeuo pipefail
trap 'echo "FAILED: line $LINENO: $BASH_COMMAND" >&2' ERR

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PYTHON=${PYTHON:-python3}
TIESFED=${TIESFED:-tiesfed}
RAY=${RAY:-ray}
TOOLS="$HERE/tools.py"

export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_USAGE_STATS_ENABLED=0
unset RAY_ADDRESS RAY_AUTH_TOKEN  # never join or authenticate to a cluster we were not pointed at
export PYTHONUNBUFFERED=1

T0=$(date +%s.%N)
now() { "$PYTHON" -c "import time; print(f'{time.time() - $T0:.1f}')"; }
dt() { "$PYTHON" -c "print(f'{$2 - $1:.1f}')"; }
log() { printf '[%6ss] %s\n' "$(now)" "$*"; }
die() { printf 'FAILED: %s\n' "$*" >&2; exit 1; }

# ----------------------------------------------------------------------------- work dir
if [[ $# -ge 1 ]]; then
    WORK=$1
    mkdir -p "$WORK"
    [[ -z $(ls -A "$WORK") ]] || die "$WORK is not empty"
    WORK=$(cd "$WORK" && pwd)
else
    WORK=$(mktemp -d "${TMPDIR:-/tmp}/tiesfed-local.XXXXXX")
fi
# Ray's Unix sockets live under its temp dir (session_<date>_<pid>/sockets/plasma_store): keep
# that path within the 107 bytes of sun_path, else give Ray a short dir of its own
RAY_TMP="$WORK/ray"
OWN_RAY_TMP=0
if (( ${#RAY_TMP} > 40 )); then
    RAY_TMP=$(mktemp -d /tmp/tfl-ray.XXXXXX)
    OWN_RAY_TMP=1
fi
LOGS="$WORK/logs"
mkdir -p "$LOGS" "$RAY_TMP"
PIDS="$WORK/ray.pids"  # the Ray daemons: pid, start time, command
: >"$PIDS"

COORD_PID=""
MERGE_PID=""
CLIENT_PIDS=()
GCS_PORT=""

stop_child() {  # PID of a child not yet reaped: SIGTERM, up to 15 s, then SIGKILL; reaps it
    local pid=$1 i
    kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 150; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

cleanup() {
    local rc=$? pid
    trap - EXIT INT TERM ERR
    trap '' PIPE  # a closed stdout must not cut the cleanup short
    set +e
    t_stop=$(date +%s.%N)
    for pid in "${CLIENT_PIDS[@]}" $MERGE_PID; do [[ -n $pid ]] && stop_child "$pid"; done
    [[ -n $COORD_PID ]] && stop_child "$COORD_PID"
    # the Ray daemons recorded after `ray start`, anything else naming our temp dirs or our
    # GCS (the client server's command line names only the GCS), and all their descendants
    # (DashboardAgent, RuntimeEnvAgent and workers retitle themselves `ray::...`)
    "$PYTHON" "$TOOLS" stop --pids "$PIDS" --match "$RAY_TMP" --match "$WORK" \
        ${GCS_PORT:+"--match=--address=127.0.0.1:$GCS_PORT"} >>"$LOGS/stop.log" 2>&1 \
        || { echo "could not stop every process:" >&2; tail -n 5 "$LOGS/stop.log" >&2; (( rc )) || rc=1; }
    echo "stopped: coordinator, clients and $(grep -c " SIGTERM " "$LOGS/stop.log" || true) Ray processes by PID" \
        "in $(dt "$t_stop" "$(date +%s.%N)") s ($(grep -c " SIGKILL " "$LOGS/stop.log" || true) needed SIGKILL)"
    if (( rc != 0 )); then
        echo "--- logs ($LOGS) ---" >&2
        for f in "$LOGS"/*.log; do
            [[ -s $f ]] || continue
            echo "=== $(basename "$f") (last 30 lines)" >&2
            tail -n 30 "$f" >&2
        done
    fi
    if [[ ${KEEP:-0} == 1 ]]; then
        echo "kept: $WORK$( (( OWN_RAY_TMP )) && echo " and $RAY_TMP")"
    else
        rm -rf "$WORK"
        (( OWN_RAY_TMP )) && rm -rf "$RAY_TMP"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

log "work dir $WORK (ray temp dir $RAY_TMP)"

# ----------------------------------------------------------------------------- 1. models and PKI
MODELS="$WORK/models"
PKI="$WORK/pki"
"$PYTHON" "$TOOLS" family "$MODELS" --dtype "${FAMILY_DTYPE:-float32}" >"$LOGS/family.log" 2>&1 || die "making the model family"
log "models: $(cat "$LOGS/family.log")"
BASE="$MODELS/base"
CLIENTS=(org-a org-b org-c)
{
    "$TIESFED" pki init "$PKI/ca"
    "$TIESFED" pki issue "$PKI/ca" --server 127.0.0.1,localhost -o "$PKI/server"
    for c in "${CLIENTS[@]}"; do "$TIESFED" pki issue "$PKI/ca" --client "$c" -o "$PKI/$c"; done
} >"$LOGS/pki.log" 2>&1 || die "tiesfed pki"
[[ -f $PKI/ca/crl.pem ]] || die "tiesfed pki init wrote no $PKI/ca/crl.pem"
log "pki: CA, server 127.0.0.1/localhost, clients ${CLIENTS[*]}"

# 17 single ports (16 for Ray, 1 for the coordinator) and two ranges of 32 worker ports, free on
# 127.0.0.1 now; the clients need the coordinator's port before it runs
read -r GCS_PORT H_NM H_OM H_CLIENT H_DASH H_METRICS H_AGENT H_AGENT_GRPC H_RTENV H_MONITOR \
        W_NM W_OM W_METRICS W_AGENT W_AGENT_GRPC W_RTENV COORD_PORT H_WORKERS W_WORKERS \
        < <("$PYTHON" "$TOOLS" ports 17 32)
[[ -n ${W_WORKERS:-} ]] || die "could not pick free ports"
TARGET="127.0.0.1:$COORD_PORT"

# ----------------------------------------------------------------------------- 2. the clients, before anything else runs
# (they wait for the coordinator while Ray starts), and the local merge of the same models
t_clients=$(now)
for i in 0 1 2; do
    c=${CLIENTS[$i]}
    "$TIESFED" client submit "$BASE" "$MODELS/ft$i" --tls "$PKI/$c" --target "$TARGET" --round r1 \
        --wait-for-coordinator 120 --json -q >"$LOGS/submit-$c.json" 2>"$LOGS/submit-$c.log" &
    CLIENT_PIDS+=($!)
done
log "clients ${CLIENTS[*]} started (pids ${CLIENT_PIDS[*]}), to wait for a coordinator at $TARGET"
LOCAL="$WORK/merged-local"
timeout 300 "$TIESFED" merge "$BASE" "$MODELS/ft0" "$MODELS/ft1" "$MODELS/ft2" -o "$LOCAL" --k 20 --lambda 1.0 -q \
    >"$LOGS/merge.log" 2>&1 &
MERGE_PID=$!

# ----------------------------------------------------------------------------- 3. Ray: head + worker node
# a Ray auth token of this deployment's own (Ray 2.5x enables token auth by default and
# would otherwise read or create ~/.ray/auth_token, shared with every other cluster)
"$PYTHON" -c 'import secrets; print(secrets.token_hex(32))' >"$WORK/ray-auth-token"
chmod 600 "$WORK/ray-auth-token"
export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$WORK/ray-auth-token"

OBJECT_STORE=$((100 * 1024 * 1024))
record_ray() {  # record the Ray daemons started so far (pid, start time, command)
    "$PYTHON" "$TOOLS" pids --match "$RAY_TMP" "--match=--address=127.0.0.1:$GCS_PORT" >"$PIDS.new"
    mv "$PIDS.new" "$PIDS"
}
t=$(now)
AUTOSCALER_METRIC_PORT=$H_MONITOR timeout 120 "$RAY" start --head --node-ip-address 127.0.0.1 --temp-dir "$RAY_TMP" --num-cpus 1 --num-gpus 0 \
    --object-store-memory "$OBJECT_STORE" --port "$GCS_PORT" \
    --node-manager-port "$H_NM" --object-manager-port "$H_OM" \
    --min-worker-port "${H_WORKERS%-*}" --max-worker-port "${H_WORKERS#*-}" \
    --ray-client-server-port "$H_CLIENT" --include-dashboard=false --dashboard-host 127.0.0.1 \
    --dashboard-port "$H_DASH" --metrics-export-port "$H_METRICS" \
    --dashboard-agent-listen-port "$H_AGENT" --dashboard-agent-grpc-port "$H_AGENT_GRPC" \
    --runtime-env-agent-port "$H_RTENV" --disable-usage-stats >"$LOGS/ray-head.log" 2>&1 \
    || { record_ray; die "ray start --head"; }
record_ray
# RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 makes Ray use 127.0.0.1 wherever it picks an address, but
# `ray start --address` then aborts ("Multi-node Ray clusters are not supported on Windows and
# OSX"), and with =1 it rewrites 127.0.0.1 to the host's routable address and its raylet binds
# every interface; `tools.py ray-start` is `ray start` with only that guard lifted
timeout 120 "$PYTHON" "$TOOLS" ray-start --address "127.0.0.1:$GCS_PORT" --node-ip-address 127.0.0.1 \
    --temp-dir "$RAY_TMP" \
    --num-cpus 1 --num-gpus 0 --object-store-memory "$OBJECT_STORE" \
    --node-manager-port "$W_NM" --object-manager-port "$W_OM" \
    --min-worker-port "${W_WORKERS%-*}" --max-worker-port "${W_WORKERS#*-}" \
    --metrics-export-port "$W_METRICS" --dashboard-agent-listen-port "$W_AGENT" \
    --dashboard-agent-grpc-port "$W_AGENT_GRPC" --runtime-env-agent-port "$W_RTENV" \
    --disable-usage-stats >"$LOGS/ray-worker.log" 2>&1 \
    || { record_ray; die "ray start --address 127.0.0.1:$GCS_PORT (worker node)"; }
record_ray
RAYLETS=$(awk '$3 == "raylet"' "$PIDS" | wc -l)
(( RAYLETS == 2 )) || die "expected 2 raylets (head and worker node), found $RAYLETS: $(cat "$PIDS")"
RAY_S=$(dt "$t" "$(now)")
log "ray: head 127.0.0.1:$GCS_PORT + a worker node, 1 CPU each; daemons: $(awk '{printf "%s%s(%s)", sep, $3, $1; sep=" "}' "$PIDS")"

# ----------------------------------------------------------------------------- 4. the coordinator, the round, one fetch
# the coordinator starts only once every client has said it is waiting for one (each says so
# after 5 s of dialling in vain)
deadline=$((SECONDS + 100))
for i in 0 1 2; do
    until grep -q "waiting for the coordinator" "$LOGS/submit-${CLIENTS[$i]}.log"; do
        kill -0 "${CLIENT_PIDS[$i]}" 2>/dev/null || die "client ${CLIENTS[$i]} exited before the coordinator started"
        (( SECONDS < deadline )) || die "client ${CLIENTS[$i]} did not report waiting for the coordinator in 100 s"
        sleep 0.2
    done
done
log "clients ${CLIENTS[*]} are waiting: $(grep -h "waiting for the coordinator" "$LOGS"/submit-*.log | tail -n 1)"

t_coord=$(now)
SPOOL="$WORK/spool"
PORT_FILE="$WORK/coordinator.port"
"$TIESFED" coordinator serve --ray-address "127.0.0.1:$GCS_PORT" \
    --tls "$PKI/server" --crl "$PKI/ca/crl.pem" --spool "$SPOOL" --base "$BASE" \
    --listen "$TARGET" --port-file "$PORT_FILE" \
    --round r1 --clients "$(IFS=,; echo "${CLIENTS[*]}")" --option k=20 --option lambda=1.0 -v \
    >"$LOGS/coordinator.log" 2>&1 &
COORD_PID=$!
for ((i = 0; i < 1200; i++)); do
    [[ -s $PORT_FILE ]] && break
    kill -0 "$COORD_PID" 2>/dev/null || die "the coordinator exited before listening"
    sleep 0.1
done
[[ -s $PORT_FILE ]] || die "the coordinator did not listen within 120 s"
[[ $(cat "$PORT_FILE") == "$COORD_PORT" ]] || die "the coordinator bound $(cat "$PORT_FILE"), not $COORD_PORT"
t_listen=$(now)
log "coordinator (pid $COORD_PID) listening on $TARGET, sharded over the Ray cluster"

deadline=$((SECONDS + 300))
for i in 0 1 2; do
    while kill -0 "${CLIENT_PIDS[$i]}" 2>/dev/null; do
        (( SECONDS < deadline )) || die "tiesfed client submit as ${CLIENTS[$i]} still running after 300 s"
        kill -0 "$COORD_PID" 2>/dev/null || die "the coordinator exited during the round"
        sleep 0.2
    done
    rc=0
    wait "${CLIENT_PIDS[$i]}" || rc=$?
    CLIENT_PIDS[i]=""  # reaped: its pid may be reused, never signal it again
    (( rc == 0 )) || die "tiesfed client submit as ${CLIENTS[$i]} exited $rc"
done
UPLOADED=$("$PYTHON" - "$LOGS"/submit-*.json <<'EOF'
import json, sys
rs = [json.loads(open(p).read().strip().splitlines()[-1]) for p in sys.argv[1:]]
print(f"{sum(r['bytes_sent'] for r in rs):,} bytes sent, contributions "
      + ", ".join(f"{r['client_id']} {r['bytes']:,} B ({100 * r['density']:.1f}% kept)" for r in rs))
EOF
)
t_submitted=$(now)
log "submits: all 3 exited 0; $UPLOADED"

FETCHED="$WORK/merged-federated"
timeout 360 "$TIESFED" client fetch "$BASE" -o "$FETCHED" --tls "$PKI/org-a" --target "$TARGET" --round r1 \
    --timeout 300 --wait-for-coordinator 60 -q >"$LOGS/fetch.log" 2>&1 || die "tiesfed client fetch"
t_fetched=$(now)
log "fetch (org-a): $(head -n 1 "$LOGS/fetch.log")"

# every socket the coordinator, the Ray daemons and the shard actors listen on is loopback
"$PYTHON" "$TOOLS" listening --match "$RAY_TMP" --match "$WORK" "--match=--address=127.0.0.1:$GCS_PORT" \
    >"$LOGS/listening.log" 2>&1 || { cat "$LOGS/listening.log"; die "a process listens beyond loopback"; }
log "$(cat "$LOGS/listening.log")"

# ----------------------------------------------------------------------------- 5. the local merge, compared
rc=0
wait "$MERGE_PID" || rc=$?
MERGE_PID=""  # reaped
(( rc == 0 )) || die "tiesfed merge exited $rc"
log "tiesfed merge: $(tail -n 1 "$LOGS/merge.log")"

"$PYTHON" "$TOOLS" compare "$FETCHED" "$LOCAL" >"$LOGS/compare.log" 2>&1 \
    || { cat "$LOGS/compare.log"; die "the fetched model differs from tiesfed merge"; }
COMPARED=$(cat "$LOGS/compare.log")
ACTORS_MODEL="$SPOOL/rounds/r1/model"
if [[ -d $ACTORS_MODEL ]]; then
    "$PYTHON" "$TOOLS" compare "$ACTORS_MODEL" "$LOCAL" >"$LOGS/compare-spool.log" 2>&1 \
        || { cat "$LOGS/compare-spool.log"; die "the coordinator's merged model ($ACTORS_MODEL) differs from tiesfed merge"; }
    SPOOL_MODEL="the coordinator's own merged model (spool): equal too"
else
    SPOOL_MODEL="the coordinator wrote no merged model to $ACTORS_MODEL"
fi

cat <<EOF
--- summary
ray cluster:     2 nodes on 127.0.0.1 (GCS port $GCS_PORT), started in ${RAY_S} s; $(cat "$LOGS/listening.log")
round r1:        3 clients (mutual TLS) started $(dt "$t_clients" "$t_coord") s before the coordinator and waiting for it; coordinator listening after $(dt "$t_coord" "$t_listen") s, all 3 submits done $(dt "$t_listen" "$t_submitted") s later, fetch $(dt "$t_submitted" "$t_fetched") s
uploads:         $UPLOADED
local merge:     $(tail -n 1 "$LOGS/merge.log")
compared:        fetched model vs tiesfed merge: $COMPARED; $SPOOL_MODEL
total:           $(now) s
bit-identical: yes
EOF
