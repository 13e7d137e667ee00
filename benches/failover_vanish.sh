#!/usr/bin/env bash
# Failover when the serving server's machine vanishes (power loss, a cut cable: no FIN, no
# RST), on PostgreSQL with `qgjob server --standby`. Measures, per run:
#   takeover  cut -> the standby prints `qgjob server listening on`
#   healthz   cut -> the standby's /healthz no longer says "standby"
#   lockfree  cut -> PostgreSQL no longer shows a session of the cut-off server holding
#             the store's lock (its backend ended; polled every ~0.25 s, so coarse)
#   lost      cut -> the cut-off server logs that it lost the store's lock (from its log)
#   stopped   cut -> the cut-off server exits (with its exit code; its log says why)
# and checks that every job the cut-off server acknowledged (201) is on the new server;
# `late` counts those submitted after the cut (there should be none: it cannot store them).
#
# Setup: a throwaway PostgreSQL (initdb as the postgres user, trust auth) listening on
# 10.77.0.1:55432, the root side of a veth pair; the serving server runs in a network
# namespace behind the other side (10.77.0.2), the standby in the root namespace, both on
# the same store URL. A fresh database per run. The cut, chosen with CUT:
#   flush (default)  the namespace loses its address: the database's packets still leave
#                    its machine and are dropped silently on the far side (like a dead host;
#                    ARP for it then fails too)
#   down             the namespace's link goes down, so the database's side loses carrier
#                    and the kernel drops what it sends (nothing tells TCP either)
# (Neither needs tc netem or a packet filter, which not every kernel has.) A submit every
# 0.2 s goes on through the cut. STALL=1 also locks the jobs table from 1 s before the cut
# to 1 s after, so that the cut catches a write in flight: its answer is lost.
#
# Run as root from anywhere (needs ip, curl, jq, runuser and PostgreSQL's server binaries):
#   cargo build --release -p qgjob-cli && benches/failover_vanish.sh
# Environment: RUNS (5), CUT (flush|down), STALL (0|1), QGJOB (target/release/qgjob of this repository),
# PG_BIN (the newest /usr/lib/postgresql/*/bin), KEEP=1 keeps the logs (path printed).
# A measurement, not a test: not part of CI. Everything it starts or creates (processes, the
# namespace, the veth pair, the database cluster, its temp dir) is removed on exit.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
RUNS=${RUNS:-5}
CUT=${CUT:-flush}
STALL=${STALL:-0}
QGJOB=${QGJOB:-$ROOT/target/release/qgjob}
PG_BIN=${PG_BIN:-$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n1)}
NS=qgvanish
VR=qgv-root
VN=qgv-ns
IP_DB=10.77.0.1
IP_OLD=10.77.0.2
PGPORT=55432
OLD_ADDR=127.0.0.1:57878 # inside the namespace
NEW_ADDR=127.0.0.1:57879 # root namespace
GIVE_UP_S=300

[[ $(id -u) == 0 ]] || { echo "needs root (network namespaces)" >&2; exit 2; }
[[ $CUT == flush || $CUT == down ]] || { echo "CUT is flush or down" >&2; exit 2; }
[[ -x $QGJOB ]] || { echo "no $QGJOB: cargo build --release -p qgjob-cli" >&2; exit 2; }
for c in ip curl jq runuser "$PG_BIN/initdb" "$PG_BIN/pg_ctl"; do
  command -v "$c" >/dev/null || { echo "needs $c" >&2; exit 2; }
done
if ip netns list | grep -qw "$NS" || ip link show "$VR" >/dev/null 2>&1; then
  echo "namespace $NS or link $VR exists already (another run?)" >&2
  exit 2
fi

TMP=$(mktemp -d /tmp/qgjob-vanish.XXXXXX)
chmod 755 "$TMP"
PIDS=()

cleanup() {
  set +e
  for p in "${PIDS[@]}"; do
    pkill -9 -P "$p" 2>/dev/null # a submitter's curl
    kill -9 "$p" 2>/dev/null
  done
  wait 2>/dev/null
  if [[ -f $TMP/pg/postmaster.pid ]]; then
    runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$TMP/pg" -m immediate -w stop >/dev/null 2>&1
  fi
  ip netns del "$NS" 2>/dev/null
  ip link del "$VR" 2>/dev/null
  if [[ ${KEEP:-0} == 1 ]]; then
    echo "logs kept in $TMP"
  else
    rm -rf "$TMP"
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

now() { echo "$EPOCHREALTIME"; }
since() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; }

# --- the network: root side 10.77.0.1, the vanishing machine 10.77.0.2 ---
ip netns add "$NS"
ip link add "$VR" type veth peer name "$VN"
ip link set "$VN" netns "$NS"
ip addr add "$IP_DB/24" dev "$VR"
ip link set "$VR" up
ip -n "$NS" link set lo up
ip -n "$NS" addr add "$IP_OLD/24" dev "$VN"
ip -n "$NS" link set "$VN" up

# --- the database ---
chown postgres "$TMP"
runuser -u postgres -- "$PG_BIN/initdb" -D "$TMP/pg" -A trust -U postgres >"$TMP/initdb.log"
echo "host all all $IP_DB/24 trust" >>"$TMP/pg/pg_hba.conf"
runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$TMP/pg" -l "$TMP/pg.log" -w start \
  -o "-c listen_addresses=$IP_DB -p $PGPORT -k $TMP -c max_connections=100" >/dev/null
psql_db() { runuser -u postgres -- "$PG_BIN/psql" -h "$TMP" -p "$PGPORT" -U postgres -XAtq "$@"; }

# A job spec; `n` makes each distinct.
spec() { printf '{"org_id":"vanish","app_version_id":"v1","tests":["tests/t%s.spec.js"]}' "$1"; }

# Submits one job to the cut-off-to-be server (from inside its namespace); prints
# "<sent> <answered> <http status> <job id or ->" (times in epoch seconds).
submit_old() {
  local out code id sent
  sent=$(now)
  out=$(ip netns exec "$NS" curl -s --max-time 60 -o - -w '\n%{http_code}' \
    -H 'content-type: application/json' -d "$(spec "$1")" "http://$OLD_ADDR/v1/jobs" || true)
  code=$(tail -n1 <<<"$out")
  id=$(head -n -1 <<<"$out" | jq -r '.job_id // "-"' 2>/dev/null || echo -)
  echo "$sent $(now) ${code:-000} ${id:--}"
}

wait_for() { # seconds, description, command...
  local until_s=$((SECONDS + $1)) what=$2
  shift 2
  until "$@"; do
    ((SECONDS < until_s)) || { echo "timed out waiting for $what" >&2; return 1; }
    sleep 0.1
  done
}

healthz_new() { curl -s --max-time 1 "http://$NEW_ADDR/healthz" | jq -r .status 2>/dev/null; }

echo "qgjob: $QGJOB ($(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?'))"
echo "PostgreSQL: $("$PG_BIN/postgres" --version), kernel $(uname -r), cut: $CUT, stall: $STALL, runs: $RUNS"
echo "load before: $(uptime)"
printf '%-4s %9s %8s %9s %6s %8s %4s %6s %5s %8s\n' run takeover healthz lockfree lost stopped rc acked late missing

RESULTS=$TMP/results
: >"$RESULTS"
for run in $(seq 1 "$RUNS"); do
  D=$TMP/run$run
  mkdir -p "$D"
  DB=vanish$run
  psql_db -d postgres -c "CREATE DATABASE $DB"
  URL="postgres://postgres@$IP_DB:$PGPORT/$DB"

  ip netns exec "$NS" "$QGJOB" server --addr "$OLD_ADDR" --store postgres \
    --database-url "$URL" >"$D/old.out" 2>"$D/old.err" &
  OLD=$!
  PIDS+=("$OLD")
  wait_for 60 "the serving server" grep -qs 'listening on' "$D/old.out"
  "$QGJOB" server --addr "$NEW_ADDR" --store postgres --database-url "$URL" --standby \
    >"$D/new.out" 2>"$D/new.err" &
  NEW=$!
  PIDS+=("$NEW")
  wait_for 60 "the standby" bash -c "[[ \$(curl -s --max-time 1 http://$NEW_ADDR/healthz | jq -r .status 2>/dev/null) == standby ]]"

  for i in $(seq 1 20); do submit_old "$run-$i" >>"$D/acks"; done
  # Keeps submitting while the server is cut off: none of these may be lost if acknowledged.
  (
    i=0
    while [[ ! -e $D/stop ]]; do
      i=$((i + 1))
      submit_old "$run-late-$i" >>"$D/late"
      sleep 0.2
    done
  ) &
  SUB=$!
  PIDS+=("$SUB")
  sleep 1

  if [[ $STALL == 1 ]]; then
    # The table is locked from 1 s before the cut to 1 s after: a write is then on the wire
    # (sent, its answer lost) when the cut lands.
    psql_db -d "$DB" -c "BEGIN; LOCK TABLE jobs IN EXCLUSIVE MODE; SELECT pg_sleep(2); COMMIT" \
      >/dev/null &
    PIDS+=("$!")
    sleep 1
  fi
  T0=$(now)
  if [[ $CUT == flush ]]; then
    ip -n "$NS" addr flush dev "$VN"
  else
    ip -n "$NS" link set "$VN" down
  fi

  takeover=- healthz=- lockfree=- stopped=- rc=-
  next_probe=0
  while :; do
    t=$(now)
    if [[ $takeover == - ]] && grep -qs 'listening on' "$D/new.out"; then
      takeover=$(since "$T0" "$t")
    fi
    if [[ $stopped == - ]] && ! kill -0 "$OLD" 2>/dev/null; then
      stopped=$(since "$T0" "$t")
      set +e
      wait "$OLD"
      rc=$?
      set -e
      touch "$D/stop"
    fi
    if awk -v t="$t" -v n="$next_probe" 'BEGIN { exit !(t >= n) }'; then
      next_probe=$(awk -v t="$t" 'BEGIN { printf "%.3f", t + 0.25 }')
      if [[ $healthz == - ]]; then
        h=$(healthz_new || true)
        [[ -n $h && $h != standby ]] && healthz=$(since "$T0" "$(now)")
      fi
      if [[ $lockfree == - ]]; then
        held=$(psql_db -d "$DB" -c "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a \
          USING (pid), (SELECT hashtext('qgjob:' || current_schema())::bigint AS k) q \
          WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 \
          AND l.objid::bigint = (q.k & 4294967295) \
          AND l.classid::bigint = ((q.k >> 32) & 4294967295) \
          AND a.client_addr = '$IP_OLD'" 2>/dev/null || echo 1)
        [[ $held == 0 ]] && lockfree=$(since "$T0" "$t")
      fi
    fi
    [[ $takeover != - && $healthz != - && $stopped != - && $lockfree != - ]] && break
    if awk -v t="$t" -v a="$T0" -v g="$GIVE_UP_S" 'BEGIN { exit !(t - a > g) }'; then
      echo "run $run: gave up after ${GIVE_UP_S}s" >&2
      break
    fi
    sleep 0.05
  done
  touch "$D/stop"
  set +e
  wait "$SUB"
  set -e

  # Every acknowledged job must be on the new server.
  acked=0 late=0 missing=0
  if [[ $takeover != - ]]; then
    while read -r _ _ code id; do
      [[ $code == 201 ]] || continue
      acked=$((acked + 1))
      got=$(curl -s --max-time 5 -o /dev/null -w '%{http_code}' "http://$NEW_ADDR/v1/jobs/$id")
      [[ $got == 200 ]] || { missing=$((missing + 1)); echo "run $run: job $id acknowledged, not on the new server ($got)" >&2; }
    done < <(cat "$D/acks" "$D/late")
    late=$(awk -v t="$T0" '$1 > t && $3 == 201' "$D/late" | wc -l)
  else
    missing=?
  fi
  lost=-
  at=$(grep -m1 "lost the store's lock" "$D/old.err" | cut -d' ' -f1 || true)
  [[ -n $at ]] && lost=$(since "$T0" "$(date -d "$at" +%s.%N)")
  printf '%-4s %9s %8s %9s %6s %8s %4s %6s %5s %8s\n' "$run" "$takeover" "$healthz" "$lockfree" \
    "$lost" "$stopped" "$rc" "$acked" "$late" "$missing"
  echo "$run $takeover $healthz $lockfree $lost $stopped $rc $acked $late $missing" >>"$RESULTS"
  {
    echo "--- run $run: the cut-off server's last words"
    tail -n 4 "$D/old.err"
  } >>"$TMP/notes"

  kill -9 "$OLD" 2>/dev/null || true
  kill "$NEW" 2>/dev/null || true
  set +e
  wait "$OLD" "$NEW" 2>/dev/null
  set -e
  # The machine comes back for the next run (nothing of the old server is left to talk).
  if [[ $CUT == flush ]]; then
    ip -n "$NS" addr add "$IP_OLD/24" dev "$VN"
  else
    ip -n "$NS" link set "$VN" up
  fi
done

echo "load after: $(uptime)"
cat "$TMP/notes"
# Median and spread of each column (seconds from the cut).
for col in 2:takeover 3:healthz 4:lockfree 5:lost 6:stopped; do
  n=${col%%:*} name=${col#*:}
  awk -v n="$n" '$n != "-" { print $n }' "$RESULTS" | sort -n | awk -v name="$name" '
    { v[NR] = $1 }
    END {
      if (NR == 0) { printf "%-9s no figure\n", name; exit }
      m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
      printf "%-9s median %.2f s, min %.2f s, max %.2f s (%d runs)\n", name, m, v[1], v[NR], NR
    }'
done
