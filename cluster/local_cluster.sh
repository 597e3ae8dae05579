#!/usr/bin/env bash
# A throw-away Ray cluster on this machine: one head and K worker nodes, every node its own
# `ray start` (own raylet, object store, temp dir, ports), with token authentication on and no
# dashboard. For trying `astolfo-dist merge --executor ray` and multi-node tests on one box.
#
#   cluster/local_cluster.sh start [K] [--id ID] [--object-store-mb MB] [--cpus-per-node N]
#                                     [--spill-dir DIR]
#   cluster/local_cluster.sh status [--id ID]
#   cluster/local_cluster.sh env    [--id ID]    # eval "$(cluster/local_cluster.sh env)" = client vars
#   cluster/local_cluster.sh stop   [--id ID]
#
# K defaults to 2, MB to 200, N to 1. Objects spill to DIR/ID-NODE (default: the node's Ray
# session folder). Everything else of cluster ID lives under /tmp/astolfo-ray-ID (state file,
# token, one Ray temp dir per node). `stop` ends exactly the processes that this
# cluster's `ray start`s created (each ran under setsid; their session ids are recorded) and
# removes that folder. It never runs `ray stop`, which kills every Ray process of every user.
#
# Environment: ASTOLFO_CLUSTER_ID picks a cluster like --id; ASTOLFO_PYTHON / ASTOLFO_RAY pick the
# interpreter / `ray` executable (default: the repository's .venv, else PATH).
set -euo pipefail

ROOT_PREFIX=/tmp/astolfo-ray-     # short on purpose: Ray's unix sockets live below (108-byte limit)
MARKER_VAR=ASTOLFO_RAY_NODE_OF    # set only in the environment of this cluster's `ray start`s

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ -n ${ASTOLFO_PYTHON:-} ]]; then PY=$ASTOLFO_PYTHON
elif [[ -x $REPO/.venv/bin/python ]]; then PY=$REPO/.venv/bin/python
else PY=$(command -v python3)
fi
if [[ -n ${ASTOLFO_RAY:-} ]]; then RAY=$ASTOLFO_RAY
elif [[ -x $(dirname "$PY")/ray ]]; then RAY=$(dirname "$PY")/ray
else RAY=$(command -v ray || true)
fi

die() { echo "local_cluster: $*" >&2; exit 2; }
log() { echo "local_cluster: $*" >&2; }
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
usage() { sed -n '2,19p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit "${1:-2}"; }

# ------------------------------------------------------------------ helpers (Python, no ray import)

# N distinct free TCP ports (held open together while chosen).
free_ports() {
    "$PY" -c '
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
' "$1"
}

# The live processes of this cluster, one line each: "pid sid comm args".
# Each node's `ray start` ran under setsid, so every process it spawned (GCS, raylet, agents, log
# monitor, workers...) is in a session whose id is the SID recorded for that node. A process can
# leave its session only by calling setsid() itself, and the kernel does not give a session's id
# to a new process while that session has members. Zombies (dead, not yet reaped) are left out.
# With --marker, as a second net, a process outside those sessions whose environment holds this
# cluster's marker is listed too, with sid "-" (Ray processes that set their title clobber their
# environ, so the marker alone would not do). This script, the helper and their callers are never
# listed.
#   cluster_procs [--marker] SID...
cluster_procs() {
    local use_marker=0
    if [[ ${1:-} == --marker ]]; then use_marker=1; shift; fi
    "$PY" -c '
import os, sys
marker = sys.argv[1].encode() if sys.argv[2] == "1" else None
sids = {int(x) for x in sys.argv[3:]}
skip, p = set(), os.getpid()
while p > 1:
    skip.add(p)
    try:
        with open(f"/proc/{p}/stat", "rb") as f:
            p = int(f.read().rsplit(b")", 1)[1].split()[1])
    except OSError:
        break
for name in os.listdir("/proc"):
    if not name.isdigit() or int(name) in skip:
        continue
    try:
        with open(f"/proc/{name}/stat", "rb") as f:
            head, tail = f.read().rsplit(b")", 1)
        fields = tail.split()            # state ppid pgrp session ...
        if fields[0] == b"Z":
            continue
        sid = int(fields[3])
        if sid in sids:
            tag = str(sid)
        elif marker is None:
            continue
        else:
            with open(f"/proc/{name}/environ", "rb") as f:
                if marker not in f.read().split(b"\0"):
                    continue
            tag = "-"
        comm = head.split(b"(", 1)[1].decode(errors="replace").replace(" ", "_")
        with open(f"/proc/{name}/cmdline", "rb") as f:
            args = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        print(name, tag, comm, args[:150])
    except (OSError, IndexError, ValueError):
        pass                             # gone meanwhile, or not ours to read
' "$MARKER_VAR=$ID" "$use_marker" "$@"
}

# Send SIG to the processes of sessions SID... (except those whose comm is EXCEPT, if given),
# then wait up to WAIT seconds for all of them to be gone. Returns how many are left (max 255).
# SID... may start with --marker (see cluster_procs).
#   signal_and_wait SIG WAIT EXCEPT [--marker] SID...
signal_and_wait() {
    local sig=$1 wait_s=$2 except=$3; shift 3
    local pids waited=0
    mapfile -t pids < <(cluster_procs "$@" | awk -v x="$except" '$3 != x { print $1 }')
    ((${#pids[@]} == 0)) && return 0
    kill "-$sig" "${pids[@]}" 2>/dev/null || true
    while ((waited < wait_s * 10)); do
        mapfile -t pids < <(cluster_procs "$@" | awk -v x="$except" '$3 != x { print $1 }')
        ((${#pids[@]} == 0)) && return 0
        sleep 0.1; waited=$((waited + 1))
    done
    local n=${#pids[@]}
    return $((n > 255 ? 255 : n))
}

# ------------------------------------------------------------------ cluster selection / state

select_cluster() {                # sets ID and BASE from --id, ASTOLFO_CLUSTER_ID, or the only one
    ID=${OPT_ID:-${ASTOLFO_CLUSTER_ID:-}}
    if [[ -z $ID ]]; then
        local found=() d
        for d in "$ROOT_PREFIX"*/state; do [[ -e $d ]] && found+=("$d"); done
        [[ ${#found[@]} -eq 0 ]] && die "no local cluster found (${ROOT_PREFIX}*/state)"
        [[ ${#found[@]} -gt 1 ]] && die "several clusters, pick one with --id: ${found[*]}"
        ID=${found[0]#"$ROOT_PREFIX"}; ID=${ID%/state}
    fi
    [[ $ID =~ ^[A-Za-z0-9_-]{1,16}$ ]] || die "bad cluster id '$ID' (1-16 of A-Z a-z 0-9 _ -)"
    BASE=$ROOT_PREFIX$ID
}

load_state() {
    [[ -f $BASE/state ]] || die "no cluster '$ID' ($BASE/state missing)"
    # shellcheck disable=SC1091
    source "$BASE/state"
}

client_env() {                    # what a client (driver) on this machine needs
    cat <<EOF
unset RAY_AUTH_TOKEN
export RAY_AUTH_MODE=token
export RAY_AUTH_TOKEN_PATH=$BASE/auth_token
export RAY_ADDRESS=$ADDRESS
EOF
}

# ------------------------------------------------------------------ commands

cmd_start() {
    local k=$1 store_mb=$2 cpus=$3 spill=$4
    [[ -n $RAY && -x $RAY ]] || die "no 'ray' executable (set ASTOLFO_RAY or install ray into .venv)"
    [[ $k =~ ^[0-9]+$ ]] || die "K must be a number of worker nodes, got '$k'"
    ID=${OPT_ID:-${ASTOLFO_CLUSTER_ID:-$(od -An -N3 -tx1 /dev/urandom | tr -d ' \n')}}
    [[ $ID =~ ^[A-Za-z0-9_-]{1,16}$ ]] || die "bad cluster id '$ID' (1-16 of A-Z a-z 0-9 _ -)"
    BASE=$ROOT_PREFIX$ID
    [[ -e $BASE ]] && die "$BASE exists: cluster '$ID' is running or was not cleaned up ($0 stop --id $ID)"

    local t0; t0=$(now)
    (umask 077 && mkdir "$BASE")
    # A token for this cluster only, in its own file (mode 600). Nothing is written to
    # ~/.ray/auth_token, so other Ray clusters and clients of this user are not affected.
    (umask 077 && "$PY" -c 'import secrets, sys; sys.stdout.write(secrets.token_hex(32))' >"$BASE/auth_token")

    # The environment of every `ray start` below, and so of every process it spawns (and only
    # theirs: this script's own environment stays clean). RAY_AUTH_MODE=token is set explicitly:
    # without it Ray 2.60's `ray start --head` turns auth on only if it happens to find a token
    # (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token), and a worker node never does.
    # The caller's RAY_AUTH_TOKEN / RAY_ADDRESS must not leak in.
    local ray_env=(env -u RAY_AUTH_TOKEN -u RAY_ADDRESS
        RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$BASE/auth_token" RAY_USAGE_STATS_ENABLED=0
        "$MARKER_VAR=$ID")

    local store_bytes=$((store_mb * 1024 * 1024))
    local names=() sids=() ports=() gcs_port client_port as_metrics dash_metrics
    read -r gcs_port client_port as_metrics dash_metrics < <(free_ports 4)
    ADDRESS=127.0.0.1:$gcs_port

    write_state() {   # written before each node starts, so that `stop` can undo a failed start
        cat >"$BASE/state" <<EOF
ID=$ID
BASE=$BASE
ADDRESS=$ADDRESS
WORKERS=$k
SPILL="$spill"
NODES="${names[*]}"
SIDS="${sids[*]}"
STARTED=$(date -u +%Y-%m-%dT%H:%M:%SZ)
EOF
    }
    write_state

    local i name pid tdir args
    for ((i = 0; i <= k; i++)); do
        if ((i == 0)); then name=head; else name=w$i; fi
        tdir=$BASE/$name
        mkdir "$tdir"
        # node manager, object manager, dashboard agent http + grpc, runtime env agent, metrics:
        # distinct per node, since all nodes share one host (Ray's fixed defaults would collide).
        read -r -a ports < <(free_ports 6)
        args=(--node-ip-address=127.0.0.1 --temp-dir="$tdir"
            --num-cpus="$cpus" --object-store-memory="$store_bytes"
            --node-manager-port="${ports[0]}" --object-manager-port="${ports[1]}"
            --dashboard-agent-listen-port="${ports[2]}" --dashboard-agent-grpc-port="${ports[3]}"
            --runtime-env-agent-port="${ports[4]}" --metrics-export-port="${ports[5]}"
            --resources="{\"astolfo_node:$name\": 1}"
            --labels="astolfo/node=$name,astolfo/cluster=$ID"
            --disable-usage-stats --log-style=record)
        if [[ -n $spill ]]; then
            mkdir -p "$spill/$ID-$name"
            args+=(--object-spilling-directory="$spill/$ID-$name")
        fi
        local node_env=()
        if ((i == 0)); then
            args+=(--head --port="$gcs_port" --ray-client-server-port="$client_port" --include-dashboard=false)
            # The head's autoscaler and (minimal) dashboard processes serve Prometheus metrics on
            # fixed default ports (44217, 44227), which a second cluster on the host would find taken.
            node_env=(AUTOSCALER_METRIC_PORT="$as_metrics" DASHBOARD_METRIC_PORT="$dash_metrics")
        else
            args+=(--address="$ADDRESS")
        fi
        # setsid: this node's daemons get a session (and process group) of their own, whose id is
        # the pid of this `ray start`; it exits once they are up, the session stays.
        setsid "${ray_env[@]}" "${node_env[@]}" "$RAY" start "${args[@]}" >"$BASE/$name.start.log" 2>&1 &
        pid=$!
        names+=("$name:$tdir"); sids+=("$pid")
        write_state
        # The head must be up before the workers join; the workers start side by side.
        ((i == 0 || i == k)) || continue
        local j
        for ((j = (i == 0 ? 0 : 1); j <= i; j++)); do
            name=${names[j]%%:*}
            if ! wait "${sids[j]}"; then
                log "starting node $name failed; the end of $BASE/$name.start.log:"
                tail -n 30 "$BASE/$name.start.log" >&2 || true
                log "stopping what was started"
                OPT_ID=$ID cmd_stop || true
                exit 1
            fi
            log "node $name up ($(elapsed "$t0") s)"
        done
    done
    local node_ip
    node_ip=$(sed -n 's/.*Local node IP: \([^ ]*\).*/\1/p' "$BASE/head.start.log" | head -n 1)
    log "cluster '$ID' started: 1 head + $k workers in $(elapsed "$t0") s"
    cat <<EOF

cluster:  $ID   (state, token and logs under $BASE)
address:  $ADDRESS   <- --address / ray.init(address=...); Ray advertises it as ${node_ip:-?}:$gcs_port
auth:     token authentication is ON; a client on this machine needs:

$(client_env | sed 's/^/    /')

          or: eval "\$($0 env --id $ID)"
          then e.g.  astolfo-dist merge ... --executor ray --address $ADDRESS
status:   $0 status --id $ID
stop:     $0 stop --id $ID
EOF
}

cmd_status() {
    select_cluster; load_state
    echo "cluster $ID   address $ADDRESS   workers $WORKERS   started $STARTED"
    echo "state dir $BASE   token $BASE/auth_token"
    local entry
    for entry in $NODES; do echo "  node ${entry%%:*}   temp dir ${entry#*:}   logs ${entry#*:}/session_latest/logs"; done
    echo "processes (pid session comm args):"
    # shellcheck disable=SC2086
    cluster_procs --marker $SIDS | sed 's/^/  /'
    echo "ray status:"
    RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$BASE/auth_token "$RAY" status --address "$ADDRESS" 2>&1 \
        | sed 's/^/  /' || echo "  (could not reach the GCS at $ADDRESS)"
}

cmd_env() {
    select_cluster; load_state
    client_env
}

cmd_stop() {
    select_cluster
    [[ -d $BASE ]] || die "no cluster '$ID' ($BASE missing)"
    local t0; t0=$(now)
    local head_sid="" worker_sids=() all_sids=()
    if [[ -f $BASE/state ]]; then
        # shellcheck disable=SC1091
        source "$BASE/state"
        read -r -a all_sids <<<"${SIDS:-}"
        if ((${#all_sids[@]} > 0)); then
            head_sid=${all_sids[0]}
            worker_sids=("${all_sids[@]:1}")
        fi
    fi
    # Order matters: worker nodes first (their raylets unregister from a live GCS and exit at
    # once; a raylet whose GCS is already gone keeps retrying), then the head's processes, the
    # GCS last. Ray itself gives SIGTERM 16 s before SIGKILL; 10 s per step here.
    local left=0
    if ((${#worker_sids[@]} > 0)); then
        signal_and_wait TERM 10 "" "${worker_sids[@]}" || left=$?
        if ((left)); then
            log "worker nodes: $left processes left after SIGTERM:"
            cluster_procs "${worker_sids[@]}" | cut -c1-120 >&2
        fi
    fi
    if [[ -n $head_sid ]]; then
        signal_and_wait TERM 10 gcs_server "$head_sid" || left=$?
        signal_and_wait TERM 10 "" "$head_sid" || left=$?
    fi
    # Whatever is left of the cluster (or only carries its marker) gets SIGKILL.
    left=0
    signal_and_wait TERM 5 "" --marker "${all_sids[@]}" || left=$?
    if ((left)); then
        log "$left processes still running after SIGTERM, sending SIGKILL:"
        cluster_procs --marker "${all_sids[@]}" | cut -c1-120 >&2
        signal_and_wait KILL 5 "" --marker "${all_sids[@]}" || left=$?
    fi
    if [[ -n $(cluster_procs --marker "${all_sids[@]}") ]]; then
        cluster_procs --marker "${all_sids[@]}" >&2
        die "processes of cluster '$ID' are left (above); $BASE kept"
    fi
    if [[ -n ${SPILL:-} ]]; then
        local entry
        for entry in ${NODES:-}; do rm -rf -- "${SPILL:?}/$ID-${entry%%:*}"; done
    fi
    case $BASE in "$ROOT_PREFIX"?*) rm -rf -- "$BASE" ;; *) die "refusing to remove '$BASE'" ;; esac
    log "cluster '$ID' stopped in $(elapsed "$t0") s: no process of it left, $BASE removed"
}

# ------------------------------------------------------------------ arguments

[[ $# -ge 1 ]] || usage
CMD=$1; shift
OPT_ID="" K=2 STORE_MB=200 CPUS=1 SPILL=""
while [[ $# -gt 0 ]]; do
    case $1 in
        --id) OPT_ID=${2:?--id needs a value}; shift 2 ;;
        --id=*) OPT_ID=${1#--id=}; shift ;;
        --object-store-mb) STORE_MB=${2:?--object-store-mb needs a value}; shift 2 ;;
        --cpus-per-node) CPUS=${2:?--cpus-per-node needs a value}; shift 2 ;;
        --spill-dir) SPILL=$(realpath -m "${2:?--spill-dir needs a value}"); shift 2 ;;
        -h|--help) usage 0 ;;
        [0-9]*) K=$1; shift ;;
        *) die "unknown argument '$1' (try --help)" ;;
    esac
done
[[ $STORE_MB =~ ^[0-9]+$ && $STORE_MB -ge 80 ]] || die "--object-store-mb must be a number >= 80 (Ray's minimum is ~75 MiB)"

case $CMD in
    start) cmd_start "$K" "$STORE_MB" "$CPUS" "$SPILL" ;;
    status) cmd_status ;;
    env) cmd_env ;;
    stop) cmd_stop ;;
    -h|--help|help) usage 0 ;;
    *) die "unknown command '$CMD' (start | status | env | stop)" ;;
esac
