#!/usr/bin/env bash
# Stormwatch test Kafka: a real single-node Apache Kafka 4.1 broker (KRaft, combined
# broker+controller) on 127.0.0.1, run from Maven Central jars (see pom.xml).
#
#   kafka.sh build     fetch the jars into target/lib (no-op when up to date)
#   kafka.sh up        build if needed, format fresh storage, start in the background,
#                      wait until it serves metadata; prints the bootstrap address.
#                      No-op success when already running.
#   kafka.sh down      SIGTERM, then SIGKILL after KAFKA_STOP_TIMEOUT s; idempotent
#   kafka.sh status    prints running/stopped; exit 0 running, 1 unhealthy, 3 stopped
#
# Env: KAFKA_PORT (19092), KAFKA_CONTROLLER_PORT (KAFKA_PORT+1, so 19093 by default),
#      KAFKA_RUN_DIR (deploy/kafka/run), KAFKA_HEAP_OPTS (-Xms256m -Xmx512m),
#      KAFKA_START_TIMEOUT (90), KAFKA_STOP_TIMEOUT (20), KAFKA_JVM_OPTS, JAVA_HOME.
# KAFKA_PORT=0 picks free adjacent ports.
# KAFKA_SASL_SSL_PORT (unset: none; "auto": KAFKA_PORT+2) adds a client listener that wants
#      TLS and SASL (PLAIN or SCRAM-SHA-512), as managed clusters do: its certificate is made
#      by keytool for 127.0.0.1 and signed by a CA made for it, $KAFKA_RUN_DIR/tls/ca.pem;
#      the user is KAFKA_SASL_USER (stormwatch), password KAFKA_SASL_PASSWORD (stormwatch-secret).
# Only the bootstrap address goes to stdout (BOOTSTRAP=$(kafka.sh up) works);
# everything else goes to stderr.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
LIB="$HERE/target/lib"
STAMP="$HERE/target/.build-stamp"
CP="$LIB/*"
TOOLS_LOG4J="$HERE/log4j2-tools.properties"
BROKER_LOG4J="$HERE/log4j2.properties"
JAVA="${JAVA_HOME:+$JAVA_HOME/bin/}java"
KEYTOOL="${JAVA_HOME:+$JAVA_HOME/bin/}keytool"

PORT="${KAFKA_PORT:-19092}"
CPORT="${KAFKA_CONTROLLER_PORT:-}"
DIR="${KAFKA_RUN_DIR:-$HERE/run}"
START_TIMEOUT="${KAFKA_START_TIMEOUT:-90}"
STOP_TIMEOUT="${KAFKA_STOP_TIMEOUT:-20}"
HEAP_OPTS="${KAFKA_HEAP_OPTS:--Xms256m -Xmx512m}"
EXTRA_JVM_OPTS="${KAFKA_JVM_OPTS:-}"
SPORT="${KAFKA_SASL_SSL_PORT:-}"
SASL_USER="${KAFKA_SASL_USER:-stormwatch}"
SASL_PASSWORD="${KAFKA_SASL_PASSWORD:-stormwatch-secret}"

log() { printf 'kafka: %s\n' "$*" >&2; }
die() { printf 'kafka: ERROR: %s\n' "$*" >&2; exit 1; }
usage() { sed -n '2,22p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2; exit "${1:-2}"; }
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

check_env() {
    # Docker links / CI service containers export KAFKA_PORT=tcp://host:9092; refuse clearly.
    if ! [[ "$PORT" =~ ^[0-9]+$ ]] || (( PORT > 65534 )); then
        die "KAFKA_PORT must be a port number (0 = pick free ones), got '$PORT'"
    fi
    [[ -z "$CPORT" || "$CPORT" =~ ^[0-9]+$ ]] || die "KAFKA_CONTROLLER_PORT must be a port number, got '$CPORT'"
    [[ -z "$SPORT" || "$SPORT" == auto || "$SPORT" =~ ^[0-9]+$ ]] \
        || die "KAFKA_SASL_SSL_PORT must be a port number or auto, got '$SPORT'"
    [[ "$SASL_USER" =~ ^[A-Za-z0-9_.-]+$ && "$SASL_PASSWORD" =~ ^[A-Za-z0-9_.-]+$ ]] \
        || die "KAFKA_SASL_USER and KAFKA_SASL_PASSWORD: letters, digits, '_', '.' and '-' only"
    [[ "$START_TIMEOUT" =~ ^[0-9]+$ ]] || die "bad KAFKA_START_TIMEOUT: $START_TIMEOUT"
    [[ "$STOP_TIMEOUT" =~ ^[0-9]+$ ]] || die "bad KAFKA_STOP_TIMEOUT: $STOP_TIMEOUT"
}

need_java() {
    command -v "$JAVA" >/dev/null 2>&1 || die "java not found (need Java 17+; set JAVA_HOME)"
}

# ---------------------------------------------------------------- build

build_hash() {
    # Stamp is keyed on everything that changes target/lib.
    ( cd "$HERE" && { cat pom.xml; find src -type f -name '*.java' -print0 | sort -z | xargs -0 -r cat; } \
        | sha256sum | cut -d' ' -f1 )
}

build_complete() {
    [[ -f "$STAMP" && "$(cat "$STAMP")" == "$(build_hash)" ]] \
        && compgen -G "$LIB/kafka_2.13-*.jar" >/dev/null \
        && [[ -f "$LIB/stormwatch-kafka-probe.jar" ]]
}

cmd_build() {
    need_java
    build_complete && return 0
    command -v mvn >/dev/null 2>&1 || die "mvn not found (need Maven 3.8+)"
    mkdir -p "$HERE/target"
    # Serialize concurrent builds (several test sessions calling `up` at once).
    exec 8>"$HERE/target/.build.lock"
    flock -w 600 8 || die "timed out waiting for another build"
    if ! build_complete; then
        local t0 mvnlog="$HERE/target/mvn-build.log"
        t0="$(now)"
        rm -rf "$LIB" "$STAMP"   # no stale jars from an older pom on the classpath
        # Offline first (works when ~/.m2 already has everything), else fetch from Maven Central.
        if mvn -q -B -o -f "$HERE/pom.xml" package >"$mvnlog" 2>&1; then
            log "built offline from the local Maven repository"
        else
            log "building: mvn -q -B package (downloads Kafka jars from Maven Central)"
            if ! mvn -q -B -f "$HERE/pom.xml" package >"$mvnlog" 2>&1; then
                cat "$mvnlog" >&2
                die "mvn package failed (log: $mvnlog)"
            fi
        fi
        build_hash >"$STAMP"
        log "built $(find "$LIB" -name '*.jar' | wc -l) jars in $(elapsed "$t0")s -> $LIB"
    fi
    exec 8>&-
}

# ---------------------------------------------------------------- helpers

port_open() {  # something accepts TCP connections on 127.0.0.1:$1
    timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null
}

pick_free_port() {
    # Three adjacent free ports (client, controller, secure client) below the Linux ephemeral range (32768+).
    local p i
    for i in $(seq 1 200); do
        p=$(( 20000 + (RANDOM * 32768 + RANDOM) % 12000 ))
        if ! port_open "$p" && ! port_open $((p + 1)) && ! port_open $((p + 2)); then echo "$p"; return 0; fi
    done
    die "could not find three free adjacent ports"
}

resolve_dir() { mkdir -p "$DIR"; DIR="$(cd "$DIR" && pwd -P)"; }

lock_dir() {
    exec 9>"$DIR/.lock"
    flock -w 180 9 || die "timed out waiting for another kafka.sh on $DIR"
}

# pid of the broker of $DIR if alive (and really our kafka.Kafka, not a reused pid).
running_pid() {
    local pid
    [[ -f "$DIR/kafka.pid" ]] || return 1
    pid="$(cat "$DIR/kafka.pid" 2>/dev/null || true)"
    [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF "kafka.Kafka $DIR/server.properties" || return 1
    echo "$pid"
}

new_cluster_id() {
    # 16 random bytes, base64url without padding (22 chars); no leading '-' (CLI parsing).
    local id
    while :; do
        id="$(head -c 16 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=\n')"
        [[ "$id" != -* ]] && { echo "$id"; return; }
    done
}

make_tls() {  # a CA, and a broker certificate for 127.0.0.1 it signs; keytool, as Java is here anyway
    local tls="$DIR/tls" pw="stormwatch-test" kt
    kt=("$KEYTOOL" -storetype PKCS12 -storepass "$pw" -keypass "$pw")
    rm -rf "$tls" && mkdir -p "$tls"
    (
        cd "$tls"
        "${kt[@]}" -genkeypair -alias ca -keyalg RSA -keysize 2048 -validity 7 -dname "CN=Stormwatch test CA" \
            -ext bc:c -keystore ca.p12
        "$KEYTOOL" -exportcert -rfc -alias ca -keystore ca.p12 -storepass "$pw" -file ca.pem
        "${kt[@]}" -genkeypair -alias broker -keyalg RSA -keysize 2048 -validity 7 -dname "CN=127.0.0.1" \
            -keystore broker.p12
        "$KEYTOOL" -certreq -alias broker -keystore broker.p12 -storepass "$pw" -file broker.csr
        "$KEYTOOL" -gencert -rfc -alias ca -keystore ca.p12 -storepass "$pw" -validity 7 \
            -ext SAN=ip:127.0.0.1,dns:localhost -ext EKU=serverAuth -infile broker.csr -outfile broker.crt
        "$KEYTOOL" -importcert -noprompt -alias ca -file ca.pem -keystore broker.p12 -storepass "$pw"
        "$KEYTOOL" -importcert -alias broker -file broker.crt -keystore broker.p12 -storepass "$pw"
    ) >"$DIR/tls.log" 2>&1 || { cat "$DIR/tls.log" >&2; die "keytool could not make the test certificates"; }
}

secure_config() {  # the SASL_SSL listener's settings (KAFKA_SASL_SSL_PORT)
    local plain="org.apache.kafka.common.security.plain.PlainLoginModule required"
    local scram="org.apache.kafka.common.security.scram.ScramLoginModule required"
    printf '%s\n' \
        "sasl.enabled.mechanisms=PLAIN,SCRAM-SHA-512" \
        "listener.name.sasl_ssl.ssl.keystore.type=PKCS12" \
        "listener.name.sasl_ssl.ssl.keystore.location=$DIR/tls/broker.p12" \
        "listener.name.sasl_ssl.ssl.keystore.password=stormwatch-test" \
        "listener.name.sasl_ssl.ssl.key.password=stormwatch-test" \
        "listener.name.sasl_ssl.plain.sasl.jaas.config=$plain user_$SASL_USER=\"$SASL_PASSWORD\";" \
        "listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=$scram;"
}

write_config() {
    local listeners="PLAINTEXT://127.0.0.1:$PORT" protocols="CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT"
    if [[ -n "$SPORT" ]]; then
        listeners+=",SASL_SSL://127.0.0.1:$SPORT"
        protocols+=",SASL_SSL:SASL_SSL"
    fi
    cat >"$DIR/server.properties" <<EOF
# Generated by deploy/kafka/kafka.sh for tests; rewritten on every \`up\`.
process.roles=broker,controller
node.id=1
# Dynamic KRaft quorum (KIP-853): storage is formatted with --standalone.
controller.quorum.bootstrap.servers=127.0.0.1:$CPORT
controller.listener.names=CONTROLLER
listeners=$listeners,CONTROLLER://127.0.0.1:$CPORT
advertised.listeners=$listeners,CONTROLLER://127.0.0.1:$CPORT
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=$protocols

log.dirs=$DIR/data
num.partitions=4
default.replication.factor=1
min.insync.replicas=1
auto.create.topics.enable=false
delete.topic.enable=true
group.initial.rebalance.delay.ms=0

# Internal topics: one replica, few partitions (fast first group join / first transaction).
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
    if [[ -n "$SPORT" ]]; then secure_config >>"$DIR/server.properties"; fi
}

log_tail() {
    [[ -f "$DIR/kafka.log" ]] || return 0
    echo "----- last 60 lines of $DIR/kafka.log -----" >&2
    tail -n 60 "$DIR/kafka.log" >&2 || true
    echo "-----" >&2
}

stop_pid() {  # SIGTERM, wait up to STOP_TIMEOUT s, then SIGKILL
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

# Wait (while watching the broker pid) until the broker serves metadata.
wait_ready() {
    local pid="$1" bootstrap="$2" deadline="$3" probe rc remaining port="${2##*:}"
    until port_open "$port"; do   # cheap phase: listener accepts TCP
        kill -0 "$pid" 2>/dev/null || { log "broker exited during startup"; return 1; }
        (( $(date +%s) < deadline )) || { log "timed out waiting for $bootstrap to accept connections"; return 1; }
        sleep 0.2
    done
    remaining=$(( deadline - $(date +%s) ))
    (( remaining > 0 )) || remaining=1
    # Real phase: describeCluster lists the broker and listTopics works (one small JVM).
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

# ---------------------------------------------------------------- commands

cmd_up() {
    local t0 pid port bootstrap cluster_id p
    t0="$(now)"
    cmd_build
    resolve_dir
    lock_dir

    if pid="$(running_pid)"; then
        port="$(cat "$DIR/kafka.port" 2>/dev/null || true)"
        if [[ "$PORT" != 0 && "$PORT" != "$port" ]]; then
            die "a broker (pid $pid) already runs from $DIR on port $port, not $PORT; run: KAFKA_RUN_DIR=$DIR $0 down"
        fi
        bootstrap="127.0.0.1:$port"
        if wait_ready "$pid" "$bootstrap" $(( $(date +%s) + START_TIMEOUT )); then
            log "already running (pid $pid)"
            echo "$bootstrap"
            return 0
        fi
        log_tail
        die "a broker (pid $pid) runs from $DIR but does not answer on $bootstrap; run: KAFKA_RUN_DIR=$DIR $0 down"
    fi
    rm -f "$DIR/kafka.pid"

    if [[ "$PORT" == 0 ]]; then
        PORT="$(pick_free_port)"
        CPORT=""
        log "picked free port $PORT"
    fi
    [[ -n "$CPORT" ]] || CPORT=$((PORT + 1))
    [[ "$CPORT" != "$PORT" ]] || die "KAFKA_PORT and KAFKA_CONTROLLER_PORT must differ"
    [[ "$SPORT" != auto ]] || SPORT=$((PORT + 2))
    [[ -z "$SPORT" || ( "$SPORT" != "$PORT" && "$SPORT" != "$CPORT" ) ]] \
        || die "KAFKA_SASL_SSL_PORT must differ from KAFKA_PORT and KAFKA_CONTROLLER_PORT"
    for p in "$PORT" "$CPORT" $SPORT; do
        if port_open "$p"; then
            die "port 127.0.0.1:$p is already in use (KAFKA_PORT=$PORT, KAFKA_CONTROLLER_PORT=$CPORT)"
        fi
    done
    bootstrap="127.0.0.1:$PORT"

    # Fresh state on every start: tests get an empty cluster.
    rm -rf "$DIR/data" "$DIR/sasl_ssl.port"
    local scram=()
    if [[ -n "$SPORT" ]]; then
        make_tls
        echo "$SPORT" >"$DIR/sasl_ssl.port"
        scram=(--add-scram "SCRAM-SHA-512=[name=$SASL_USER,password=$SASL_PASSWORD]")
    fi
    write_config
    echo "$PORT" >"$DIR/kafka.port"
    cluster_id="$(new_cluster_id)"
    if ! "$JAVA" -Xmx256m -XX:TieredStopAtLevel=1 -Dlog4j2.configurationFile="$TOOLS_LOG4J" -cp "$CP" \
            kafka.tools.StorageTool format -t "$cluster_id" -c "$DIR/server.properties" --standalone "${scram[@]}" \
            >"$DIR/format.log" 2>&1 9>&-; then
        cat "$DIR/format.log" >&2
        die "storage format failed (see $DIR/format.log)"
    fi

    log "starting broker on $bootstrap (controller 127.0.0.1:$CPORT${SPORT:+, SASL_SSL 127.0.0.1:$SPORT}, dir $DIR)"
    # setsid: own session, so Ctrl-C to the caller's process group does not hit it.
    # stdio and the lock fd are detached so CI pipes and the lock are not held open.
    # shellcheck disable=SC2086
    setsid "$JAVA" $HEAP_OPTS -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:+ExitOnOutOfMemoryError \
        -Djava.awt.headless=true -Dlog4j2.configurationFile="$BROKER_LOG4J" \
        -Dkafka.logs.dir="$DIR" $EXTRA_JVM_OPTS \
        -cp "$CP" kafka.Kafka "$DIR/server.properties" \
        </dev/null >"$DIR/kafka.log" 2>&1 9>&- &
    pid=$!
    echo "$pid" >"$DIR/kafka.pid"

    if ! wait_ready "$pid" "$bootstrap" $(( $(date +%s) + START_TIMEOUT )); then
        log_tail
        if kill -0 "$pid" 2>/dev/null; then
            log "stopping the half-started broker (pid $pid)"
            stop_pid "$pid" || true
        fi
        rm -f "$DIR/kafka.pid"
        die "broker did not come up on $bootstrap within ${START_TIMEOUT}s (log: $DIR/kafka.log)"
    fi
    log "up in $(elapsed "$t0")s: pid $pid, log $DIR/kafka.log"
    echo "$bootstrap"
}

cmd_down() {
    local pid t0
    if [[ ! -d "$DIR" ]]; then log "not running"; return 0; fi
    resolve_dir
    lock_dir
    if ! pid="$(running_pid)"; then
        rm -f "$DIR/kafka.pid"
        log "not running"
        return 0
    fi
    t0="$(now)"
    stop_pid "$pid"
    rm -f "$DIR/kafka.pid"
    log "stopped pid $pid in $(elapsed "$t0")s"
}

cmd_status() {
    local pid port
    if [[ ! -d "$DIR" ]]; then echo "stopped"; return 3; fi
    resolve_dir
    if ! pid="$(running_pid)"; then echo "stopped"; return 3; fi
    port="$(cat "$DIR/kafka.port" 2>/dev/null || echo '?')"
    if port_open "$port"; then
        echo "running pid=$pid bootstrap=127.0.0.1:$port log=$DIR/kafka.log"
        return 0
    fi
    echo "starting-or-unhealthy pid=$pid bootstrap=127.0.0.1:$port log=$DIR/kafka.log"
    return 1
}

[[ $# -eq 1 ]] || usage 2
case "$1" in
    build) check_env; cmd_build ;;
    up|start) check_env; cmd_up ;;
    down|stop) check_env; cmd_down ;;
    status) cmd_status ;;
    -h|--help|help) usage 0 ;;
    *) log "unknown command: $1"; usage 2 ;;
esac
