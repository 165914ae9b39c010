#!/usr/bin/env bash
# Stormwatch test Kafka: a real single-node Apache Kafka 4.x broker (KRaft, combined
# broker+controller) on 127.0.0.1, built from Maven Central jars (see pom.xml).
#
#   kafka.sh build                           fetch jars into target/lib (once; stamp-keyed)
#   kafka.sh up   [--port N] [--dir DIR] [--timeout S]
#                                            start (fresh data) and wait until it serves
#                                            metadata; --port 0 picks a free port.
#                                            Last stdout line: the bootstrap address.
#   kafka.sh down [--dir DIR]                SIGTERM, wait up to 30 s, then SIGKILL
#   kafka.sh status [--dir DIR]              exit 0 running, 1 not answering, 3 stopped
#
# Only the bootstrap address goes to stdout; all chatter goes to stderr, so
#   BOOTSTRAP=$(deploy/kafka/kafka.sh up --port 0)
# works. Env overrides: STORMWATCH_KAFKA_PORT, STORMWATCH_KAFKA_DIR,
# STORMWATCH_KAFKA_TIMEOUT, STORMWATCH_KAFKA_HEAP_OPTS, STORMWATCH_KAFKA_JVM_OPTS, JAVA_HOME.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
LIB="$HERE/target/lib"
STAMP="$HERE/target/.build-stamp"
CP="$LIB/*"
TOOLS_LOG4J="$HERE/log4j2-tools.properties"
BROKER_LOG4J="$HERE/log4j2.properties"
JAVA="${JAVA_HOME:+$JAVA_HOME/bin/}java"

PORT="${STORMWATCH_KAFKA_PORT:-9092}"
DIR="${STORMWATCH_KAFKA_DIR:-$HERE/run}"
TIMEOUT="${STORMWATCH_KAFKA_TIMEOUT:-90}"
STOP_TIMEOUT=30
HEAP_OPTS="${STORMWATCH_KAFKA_HEAP_OPTS:--Xms256m -Xmx512m}"
EXTRA_JVM_OPTS="${STORMWATCH_KAFKA_JVM_OPTS:-}"

log() { printf 'kafka: %s\n' "$*" >&2; }
die() { printf 'kafka: ERROR: %s\n' "$*" >&2; exit 1; }

usage() {
    sed -n '2,18p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
    exit "${1:-2}"
}

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

need_java() {
    command -v "$JAVA" >/dev/null 2>&1 || die "java not found (need Java 17+; set JAVA_HOME)"
}

# ---------------------------------------------------------------- build

build_hash() {
    # Key the stamp on everything that changes the contents of target/lib.
    (
        cd "$HERE"
        { cat pom.xml; find src -type f -name '*.java' -print0 | sort -z | xargs -0 -r cat; } | sha256sum | cut -d' ' -f1
    )
}

build_complete() {
    [[ -f "$STAMP" ]] && [[ "$(cat "$STAMP")" == "$(build_hash)" ]] \
        && compgen -G "$LIB/kafka_2.13-*.jar" >/dev/null \
        && [[ -f "$LIB/stormwatch-kafka-probe.jar" ]]
}

cmd_build() {
    [[ $# -eq 0 ]] || die "build takes no arguments"
    need_java
    if build_complete; then
        log "jars up to date in $LIB"
        return 0
    fi
    command -v mvn >/dev/null 2>&1 || die "mvn not found (need Maven 3.8+)"
    mkdir -p "$HERE/target"
    # Serialize concurrent builds (parallel test workers all calling `up`).
    exec 8>"$HERE/target/.build.lock"
    flock -w 600 8 || die "timed out waiting for another build"
    if build_complete; then
        log "jars up to date in $LIB"
        exec 8>&-
        return 0
    fi
    local t0
    t0="$(now)"
    log "building: mvn -q -B package (downloads Kafka jars from Maven Central on a cold cache)"
    rm -rf "$LIB" "$STAMP"   # no stale jars from an older pom on the classpath
    # Maven output goes to a file (Debian's Maven 3.8 prints stray ANSI codes even with -B);
    # it is shown only when the build fails.
    if ! mvn -q -B -f "$HERE/pom.xml" package >"$HERE/target/mvn-build.log" 2>&1; then
        cat "$HERE/target/mvn-build.log" >&2
        die "mvn package failed (log: $HERE/target/mvn-build.log)"
    fi
    build_hash >"$STAMP"
    log "built $(find "$LIB" -name '*.jar' | wc -l) jars in $(elapsed "$t0")s -> $LIB"
    exec 8>&-
}

# ---------------------------------------------------------------- helpers

# True if something accepts TCP connections on 127.0.0.1:$1.
port_open() {
    timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null
}

pick_free_port() {
    # Kafka needs two adjacent ports (PLAINTEXT=p, CONTROLLER=p+1). Stay below the Linux
    # ephemeral range (32768+) so outgoing connections cannot grab them.
    local p i
    for i in $(seq 1 200); do
        p=$(( 20000 + (RANDOM * 32768 + RANDOM) % 12000 ))
        if ! port_open "$p" && ! port_open $((p + 1)); then
            echo "$p"
            return 0
        fi
    done
    die "could not find two free adjacent ports"
}

# pid of our broker for $DIR if it is alive (and really is our broker), else nothing.
running_pid() {
    local pidfile="$DIR/kafka.pid" pid
    [[ -f "$pidfile" ]] || return 1
    pid="$(cat "$pidfile" 2>/dev/null || true)"
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    kill -0 "$pid" 2>/dev/null || return 1
    # Guard against pid reuse: the process must be kafka.Kafka with our config.
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF "kafka.Kafka $DIR/server.properties" || return 1
    echo "$pid"
}

resolve_dir() {
    mkdir -p "$DIR"
    DIR="$(cd "$DIR" && pwd -P)"
}

lock_dir() {
    exec 9>"$DIR/.lock"
    flock -w 180 9 || die "timed out waiting for another kafka.sh on $DIR"
}

new_cluster_id() {
    # Kafka cluster ids are 16 random bytes, base64url without padding (22 chars).
    # Kafka's own generator avoids a leading '-' (CLI parsing); so do we.
    local id
    while :; do
        id="$(head -c 16 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=\n')"
        [[ "$id" != -* ]] && { echo "$id"; return; }
    done
}

write_config() {
    local port="$1" cport=$(( $1 + 1 ))
    cat >"$DIR/server.properties" <<EOF
# Generated by deploy/kafka/kafka.sh for tests. Do not edit: rewritten on every \`up\`.
process.roles=broker,controller
node.id=1
# Dynamic KRaft quorum (KIP-853): storage is formatted with --standalone.
controller.quorum.bootstrap.servers=127.0.0.1:$cport
controller.listener.names=CONTROLLER
listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$cport
advertised.listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$cport
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT

log.dirs=$DIR/data
num.partitions=3
default.replication.factor=1
min.insync.replicas=1
auto.create.topics.enable=false
delete.topic.enable=true
group.initial.rebalance.delay.ms=0

# Internal topics: one replica, few partitions (fast first group join / first txn).
offsets.topic.replication.factor=1
offsets.topic.num.partitions=3
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=3
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
share.coordinator.state.topic.num.partitions=3

# Small footprint.
num.network.threads=2
num.io.threads=4
num.recovery.threads.per.data.dir=1
log.retention.hours=24
log.segment.bytes=67108864
EOF
}

log_tail() {
    if [[ -f "$DIR/kafka.log" ]]; then
        echo "----- last 60 lines of $DIR/kafka.log -----" >&2
        tail -n 60 "$DIR/kafka.log" >&2 || true
        echo "-----" >&2
    fi
}

# Stop pid: SIGTERM, wait up to STOP_TIMEOUT s, then SIGKILL.
stop_pid() {
    local pid="$1" i
    kill -TERM "$pid" 2>/dev/null || return 0
    for ((i = 0; i < STOP_TIMEOUT * 5; i++)); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.2
    done
    log "pid $pid did not stop after ${STOP_TIMEOUT}s; sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    die "pid $pid survived SIGKILL"
}

# Run the readiness probe (one JVM) while watching the broker pid.
wait_ready() {
    local pid="$1" bootstrap="$2" deadline="$3" probe rc remaining port="${2##*:}"
    # Cheap phase: wait for the listener to accept TCP connections.
    until port_open "$port"; do
        kill -0 "$pid" 2>/dev/null || { log "broker exited during startup"; return 1; }
        (( $(date +%s) < deadline )) || { log "timed out waiting for $bootstrap to accept connections"; return 1; }
        sleep 0.2
    done
    # Real phase: metadata answers (describeCluster has the broker, listTopics works).
    remaining=$(( deadline - $(date +%s) ))
    (( remaining > 0 )) || remaining=1
    "$JAVA" -Xmx128m -XX:TieredStopAtLevel=1 -Dlog4j2.configurationFile="$TOOLS_LOG4J" \
        -cp "$CP" stormwatch.kafka.WaitReady "$bootstrap" "$remaining" >&2 9>&- &
    probe=$!
    while kill -0 "$probe" 2>/dev/null; do
        if ! kill -0 "$pid" 2>/dev/null; then
            kill "$probe" 2>/dev/null || true
            wait "$probe" 2>/dev/null || true
            log "broker exited during startup"
            return 1
        fi
        sleep 0.2
    done
    rc=0
    wait "$probe" || rc=$?
    return "$rc"
}

parse_opts() {
    # Sets PORT / DIR / TIMEOUT from --port N, --dir DIR, --timeout S (also --x=v).
    local allowed="$1"
    shift
    while [[ $# -gt 0 ]]; do
        local opt="$1" val
        case "$opt" in
            --*=*) val="${opt#*=}"; opt="${opt%%=*}" ;;
            --port|--dir|--timeout) [[ $# -ge 2 ]] || die "$opt needs a value"; val="$2"; shift ;;
            -h|--help) usage 0 ;;
            *) die "unknown argument: $opt" ;;
        esac
        [[ " $allowed " == *" $opt "* ]] || die "option $opt not accepted here"
        case "$opt" in
            --port) PORT="$val" ;;
            --dir) DIR="$val" ;;
            --timeout) TIMEOUT="$val" ;;
        esac
        shift
    done
    if ! [[ "$PORT" =~ ^[0-9]+$ ]] || (( PORT > 65534 )); then
        die "bad port: $PORT (0 = pick a free one)"
    fi
    [[ "$TIMEOUT" =~ ^[0-9]+$ ]] || die "bad timeout: $TIMEOUT"
}

# ---------------------------------------------------------------- up

cmd_up() {
    parse_opts "--port --dir --timeout" "$@"
    local t0
    t0="$(now)"
    need_java
    cmd_build
    resolve_dir
    lock_dir

    local pid port bootstrap
    if pid="$(running_pid)"; then
        port="$(cat "$DIR/kafka.port" 2>/dev/null || true)"
        if [[ "$PORT" != 0 && "$PORT" != "$port" ]]; then
            die "a broker (pid $pid) already runs from $DIR on port $port, not $PORT; run: $0 down --dir $DIR"
        fi
        bootstrap="127.0.0.1:$port"
        if wait_ready "$pid" "$bootstrap" $(( $(date +%s) + TIMEOUT )); then
            log "already running (pid $pid), nothing to do"
            echo "$bootstrap"
            return 0
        fi
        log_tail
        die "a broker (pid $pid) runs from $DIR but does not answer on $bootstrap; run: $0 down --dir $DIR"
    fi
    rm -f "$DIR/kafka.pid"

    if [[ "$PORT" == 0 ]]; then
        PORT="$(pick_free_port)"
        log "picked free port $PORT (controller $((PORT + 1)))"
    fi
    local p
    for p in "$PORT" $((PORT + 1)); do
        if port_open "$p"; then
            die "port 127.0.0.1:$p is already in use by another process (need $PORT for PLAINTEXT and $((PORT + 1)) for CONTROLLER); try --port 0"
        fi
    done
    bootstrap="127.0.0.1:$PORT"

    # Fresh state on every start: tests get an empty cluster.
    rm -rf "$DIR/data"
    write_config "$PORT"
    echo "$PORT" >"$DIR/kafka.port"

    local cluster_id
    cluster_id="$(new_cluster_id)"
    if ! "$JAVA" -Xmx256m -XX:TieredStopAtLevel=1 -Dlog4j2.configurationFile="$TOOLS_LOG4J" -cp "$CP" \
            kafka.tools.StorageTool format -t "$cluster_id" -c "$DIR/server.properties" --standalone \
            >"$DIR/format.log" 2>&1 9>&-; then
        cat "$DIR/format.log" >&2
        die "kafka-storage format failed (see $DIR/format.log)"
    fi

    log "starting broker on $bootstrap (dir $DIR)"
    # setsid: own session, so Ctrl-C / SIGINT to the caller's process group does not hit it.
    # stdin/stdout/stderr and the lock fd are detached so CI pipes and locks are not held open.
    # shellcheck disable=SC2086
    setsid "$JAVA" $HEAP_OPTS -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:+ExitOnOutOfMemoryError \
        -Djava.awt.headless=true -Dlog4j2.configurationFile="$BROKER_LOG4J" \
        -Dkafka.logs.dir="$DIR" $EXTRA_JVM_OPTS \
        -cp "$CP" kafka.Kafka "$DIR/server.properties" \
        </dev/null >"$DIR/kafka.log" 2>&1 9>&- &
    pid=$!
    echo "$pid" >"$DIR/kafka.pid"

    if ! wait_ready "$pid" "$bootstrap" $(( $(date +%s) + TIMEOUT )); then
        log_tail
        if kill -0 "$pid" 2>/dev/null; then
            log "stopping the half-started broker (pid $pid)"
            stop_pid "$pid" || true
        fi
        rm -f "$DIR/kafka.pid"
        die "broker did not come up on $bootstrap (timeout ${TIMEOUT}s; log: $DIR/kafka.log)"
    fi
    log "up in $(elapsed "$t0")s: pid $pid, log $DIR/kafka.log"
    echo "$bootstrap"
}

# ---------------------------------------------------------------- down / status

cmd_down() {
    parse_opts "--dir" "$@"
    if [[ ! -d "$DIR" ]]; then
        log "not running (no $DIR)"
        return 0
    fi
    resolve_dir
    lock_dir
    local pid
    if ! pid="$(running_pid)"; then
        rm -f "$DIR/kafka.pid"
        log "not running"
        return 0
    fi
    local t0
    t0="$(now)"
    stop_pid "$pid"
    rm -f "$DIR/kafka.pid"
    log "stopped pid $pid in $(elapsed "$t0")s"
}

cmd_status() {
    parse_opts "--dir" "$@"
    if [[ ! -d "$DIR" ]]; then
        echo "stopped"
        return 3
    fi
    resolve_dir
    local pid port
    if ! pid="$(running_pid)"; then
        echo "stopped"
        return 3
    fi
    port="$(cat "$DIR/kafka.port" 2>/dev/null || echo '?')"
    if port_open "$port"; then
        echo "running pid=$pid bootstrap=127.0.0.1:$port log=$DIR/kafka.log"
        return 0
    fi
    echo "starting-or-unhealthy pid=$pid bootstrap=127.0.0.1:$port log=$DIR/kafka.log"
    return 1
}

# ---------------------------------------------------------------- main

[[ $# -ge 1 ]] || usage 2
cmd="$1"
shift
case "$cmd" in
    build) cmd_build "$@" ;;
    up|start) cmd_up "$@" ;;
    down|stop) cmd_down "$@" ;;
    status) cmd_status "$@" ;;
    -h|--help|help) usage 0 ;;
    *) log "unknown command: $cmd"; usage 2 ;;
esac
