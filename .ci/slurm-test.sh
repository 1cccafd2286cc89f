#!/usr/bin/env bash
# End-to-end test of `rest sweep --backend slurm` on a real single-node Slurm started here:
# munged, slurmctld and slurmd on localhost with their config, state and logs in a temporary
# directory; a 4-run sweep (1 epoch, small splits) is submitted as a job array and followed
# with `rest sweep --status` until done, while a local sweep over the same directory runs
# beside it (each run must be trained exactly once). Needs root (daemons) and, if Slurm is missing, apt.
# Everything started here is stopped, and the temporary directory removed, on exit.
#
#   .ci/slurm-test.sh            # uses target/release/rest (built if missing)
#   REST_BIN=/path/rest .ci/slurm-test.sh
#   SLURM_TEST_TIMEOUT=600 ...   # seconds to wait for the sweep (default 300)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

if [ "$(id -u)" != 0 ]; then
    echo "error: the Slurm test starts slurmctld/slurmd and needs root" >&2
    exit 1
fi
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
    echo "installing slurm-wlm and munge ..."
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
fi
REST_BIN=${REST_BIN:-$ROOT/target/release/rest}
if [ ! -x "$REST_BIN" ]; then
    cargo build --release
fi
TIMEOUT=${SLURM_TEST_TIMEOUT:-300}

T=$(mktemp -d /tmp/rest-slurm-test.XXXXXX)
chmod 755 "$T"
cleanup() {
    local rc=$?
    # Stop what this script started, by pid file: jobs first, then the daemons.
    if [ -f "$T/slurmctld.pid" ]; then
        scancel --full --quiet -u root 2>/dev/null || true
    fi
    for p in slurmd slurmctld munged; do
        if [ -f "$T/$p.pid" ]; then
            kill "$(cat "$T/$p.pid")" 2>/dev/null || true
        fi
    done
    sleep 1
    for p in slurmd slurmctld munged; do
        if [ -f "$T/$p.pid" ]; then
            kill -9 "$(cat "$T/$p.pid")" 2>/dev/null || true
        fi
    done
    if [ "$rc" != 0 ]; then
        echo "--- slurm test failed; logs:" >&2
        tail -n 20 "$T"/*.log "$T"/out/slurm/*.out "$T"/out/*/train.log 2>/dev/null >&2 || true
    fi
    rm -rf "$T"
    exit "$rc"
}
trap cleanup EXIT INT TERM

# --- munge, with its own key and socket ---
mkdir -p "$T/munge"
chmod 700 "$T/munge"
dd if=/dev/urandom of="$T/munge/munge.key" bs=1024 count=1 status=none
chmod 400 "$T/munge/munge.key"
munged --force --key-file="$T/munge/munge.key" --socket="$T/munge/munge.sock" \
    --pid-file="$T/munged.pid" --log-file="$T/munged.log" --seed-file="$T/munge/seed"

# --- slurm.conf: this machine as the one node, with its real CPUs and memory ---
HOST=$(hostname -s)
NODE=$(slurmd -C | head -n 1) # NodeName=HOST CPUs=.. ... RealMemory=..
mkdir -p "$T/state" "$T/spool"
cat >"$T/slurm.conf" <<EOF
ClusterName=resttest
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
SlurmctldPort=16817
SlurmdPort=16818
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$T/munge/munge.sock
StateSaveLocation=$T/state
SlurmdSpoolDir=$T/spool
SlurmctldPidFile=$T/slurmctld.pid
SlurmdPidFile=$T/slurmd.pid
SlurmctldLogFile=$T/slurmctld.log
SlurmdLogFile=$T/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
MinJobAge=600
$NODE NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=test Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
export SLURM_CONF=$T/slurm.conf
slurmctld
slurmd

echo "waiting for node $HOST to be idle ..."
for i in $(seq 1 60); do
    state=$(sinfo -h -n "$HOST" -o %T 2>/dev/null || true)
    [ "$state" = idle ] && break
    sleep 1
done
if [ "$state" != idle ]; then
    echo "error: node $HOST is '${state:-unknown}' after 60 s" >&2
    exit 1
fi

# --- a 4-run sweep ---
cat >"$T/sweep.toml" <<EOF
[base]
epochs = 1
train_size = 3000
valid_size = 200
test_size = 200
[grid]
density = [1.0, 0.05]
seed = [1, 2]
EOF
"$REST_BIN" sweep "$T/sweep.toml" --dry-run --out "$T/out"
"$REST_BIN" sweep "$T/sweep.toml" --backend slurm --out "$T/out" --cpus-per-task 1 \
    --partition test --time 10:00

start=$(date +%s)
LOCAL=
while :; do
    status=$("$REST_BIN" sweep --status --out "$T/out")
    # (no `| head`: with pipefail, echo's SIGPIPE when head exits early would end the script)
    first=${status%%$'\n'*}
    echo "$first"
    # Once the array has started, a local sweep over the same directory runs beside it: the
    # runs are claimed one by one, so each is trained exactly once, by a Slurm task or by
    # the local sweep.
    if [ -z "$LOCAL" ] && [[ $first != *" 0 done, 0 running"* ]]; then
        "$REST_BIN" sweep "$T/sweep.toml" --out "$T/out" --jobs 1 --threads 1 >"$T/local.log" 2>&1 &
        LOCAL=$!
    fi
    case "$first" in
        "4 runs: 4 done,"*) break ;;
    esac
    if [[ $first =~ \ [1-9][0-9]*\ failed ]]; then
        echo "$status" >&2
        echo "error: a run failed" >&2
        exit 1
    fi
    if [ $(($(date +%s) - start)) -gt "$TIMEOUT" ]; then
        echo "$status" >&2
        squeue >&2 || true
        echo "error: the sweep did not finish in $TIMEOUT s" >&2
        exit 1
    fi
    sleep 1
done
echo "$status"
if [ -z "$LOCAL" ]; then
    echo "error: the local sweep never started" >&2
    exit 1
fi
if ! wait "$LOCAL"; then
    cat "$T/local.log" >&2
    echo "error: the local sweep beside the array failed" >&2
    exit 1
fi
cat "$T/local.log"
for log in "$T"/out/*/train.log; do
    c=$(grep -c '^=== rest sweep:' "$log" || true)
    if [ "$c" != 1 ]; then
        cat "$log" >&2
        echo "error: $log shows $c trainings of its run (expected 1)" >&2
        exit 1
    fi
done
by_slurm=$(grep -l '^=== rest sweep:.*slurm task' "$T"/out/*/train.log | wc -l || true)
echo "each run trained once: $by_slurm by Slurm tasks, $((4 - by_slurm)) by the local sweep"

n=$(find "$T/out" -mindepth 2 -maxdepth 2 -name summary.json | wc -l)
if [ "$n" != 4 ]; then
    echo "error: expected 4 summary.json files, found $n" >&2
    exit 1
fi
# The report job runs after the array; give it a little time.
for i in $(seq 1 30); do
    [ -z "$(squeue -h 2>/dev/null)" ] && break
    sleep 1
done
if ls "$T"/out/slurm/report-*.out >/dev/null 2>&1; then
    cat "$T"/out/slurm/report-*.out
fi
if [ -f "$T/out/report.md" ]; then
    grep -q '|' "$T/out/report.md" || {
        echo "error: report.md has no table" >&2
        exit 1
    }
    echo "report: ok"
fi
# Resubmitting a finished sweep submits nothing.
again=$("$REST_BIN" sweep "$T/sweep.toml" --backend slurm --out "$T/out")
echo "$again"
case "$again" in
    "all 4 runs are done"*) ;;
    *)
        echo "error: a finished sweep was submitted again" >&2
        exit 1
        ;;
esac
echo "slurm test: ok ($(($(date +%s) - start)) s)"
