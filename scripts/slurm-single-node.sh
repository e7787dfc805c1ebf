#!/usr/bin/env bash
# slurm-single-node.sh -- a throw-away, one-node Slurm cluster for tests.
#
# Starts a private munged, slurmctld and slurmd on this machine, all state
# (key, sockets, config, spool, logs, pids) under one directory, no systemd,
# no cgroups, no accounting database.  Then `sbatch`, `srun`, `squeue`,
# `scancel`, `sinfo` work as on a real cluster, as long as SLURM_CONF points
# at the generated config (print it with `env`).
#
# Checked on Debian 12 (bookworm), Slurm 22.05.8, munge 0.5.15, as root, in
# a container whose PID 1 is not an init and with no usable cgroup setup.
#
# Needs: root (slurmd must be root to start jobs), the Debian packages
#   apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge
# (about 3.3 MiB; `slurm-single-node.sh install` runs exactly that).
#
# Usage:
#   slurm-single-node.sh install   apt-get install the four packages above
#   slurm-single-node.sh up        write config + key, start the 3 daemons,
#                                  wait until the node is idle (non-zero on failure,
#                                  with the log tails printed)
#   slurm-single-node.sh down      cancel all jobs, stop the daemons started by
#                                  `up` (by their recorded PIDs), delete the dir
#   slurm-single-node.sh status    pids + sinfo + squeue
#   slurm-single-node.sh env       print `export SLURM_CONF=...` for eval
#
# Parameters (environment):
#   SLURM_TEST_DIR    state directory, deleted by `down`  (default /tmp/slurm-test)
#                     KEEP IT SHORT (< ~60 chars): munge and slurmstepd put unix
#                     sockets in it, and socket paths are limited to 107 bytes.
#   SLURM_TEST_CPUS   CPUs the node offers              (default: `nproc`)
#   SLURM_TEST_PORT   slurmctld port; slurmd uses +1     (default 16817, so it
#                     never meets a system Slurm on 6817/6818)
#   SLURM_TEST_KEEP=1 `down` keeps the directory (logs) instead of deleting it
#
# From a pytest fixture (sketch):
#   d = tmp_path_factory.mktemp("s")   # or a short fixed path, see above
#   env = {**os.environ, "SLURM_TEST_DIR": str(d)}
#   subprocess.run([SCRIPT, "up"], env=env, check=True)
#   os.environ["SLURM_CONF"] = f"{d}/slurm.conf"; yield; subprocess.run([SCRIPT, "down"], env=env)
set -euo pipefail

DIR=${SLURM_TEST_DIR:-/tmp/slurm-test}
CPUS=${SLURM_TEST_CPUS:-$(nproc)}
PORT=${SLURM_TEST_PORT:-16817}
CONF=$DIR/slurm.conf
export SLURM_CONF=$CONF          # every client command needs this (see `env`)

die() { echo "slurm-single-node: $*" >&2; exit 1; }

# A process counts as gone when it no longer exists OR is a zombie: if PID 1
# is not a real init (containers), killed daemons are never reaped, and
# `kill -0` keeps succeeding on them forever.
alive() {
    local st
    [ -r "/proc/$1/stat" ] || return 1
    st=$(sed 's/^.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1) || return 1
    [ -n "$st" ] && [ "$st" != Z ] && [ "$st" != X ]
}

# Start "$@" detached in its own session, in the foreground mode of the daemon
# (so $! is the daemon itself, not a parent that forks and exits), and record
# its PID under $DIR/pids/NAME.
start() {
    local name=$1; shift
    setsid "$@" >"$DIR/log/$name.out" 2>&1 </dev/null &
    echo $! >"$DIR/pids/$name"
}

stop() {                         # stop NAME: TERM, wait up to 10 s, then KILL
    local f=$DIR/pids/$1 pid i
    [ -f "$f" ] || return 0
    pid=$(cat "$f")
    if alive "$pid"; then
        kill -TERM "$pid" 2>/dev/null || true
        for i in $(seq 100); do alive "$pid" || break; sleep 0.1; done
        alive "$pid" && kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$f"
}

tails() {                        # show what went wrong
    local f
    for f in "$DIR"/log/*; do echo "==> $f <=="; tail -n 15 "$f"; done >&2
}

cmd_install() {
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        slurmctld slurmd slurm-client munge
}

cmd_up() {
    [ "$(id -u)" = 0 ] || die "must run as root"
    local b
    for b in munged slurmctld slurmd sinfo; do
        command -v "$b" >/dev/null || die "$b not found: run '$0 install' first"
    done
    if [ -f "$DIR/pids/slurmctld" ] && alive "$(cat "$DIR/pids/slurmctld")"; then
        die "already up in $DIR (run '$0 down' first)"
    fi
    # Unix socket paths max out at 107 bytes; slurmstepd adds ~35 to $DIR.
    [ ${#DIR} -le 70 ] || die "SLURM_TEST_DIR is ${#DIR} chars; keep it <= 70"
    case $DIR in /*) ;; *) die "SLURM_TEST_DIR must be an absolute path" ;; esac
    rm -rf "$DIR"
    mkdir -p "$DIR"/{munge,state,spool,log,pids}
    # munged insists: socket dir searchable by all (0755), key readable only
    # by the daemon's user (0400), its dir not writable by others.  Running
    # munged as root with its own key and socket leaves /etc/munge and the
    # `munge` user out of it entirely.
    chmod 755 "$DIR" "$DIR/munge"
    dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
    chmod 400 "$DIR/munge/munge.key"

    cat >"$CONF" <<EOF
# Generated by slurm-single-node.sh -- one node called "localhost", so the
# machine's real hostname and /etc/hosts do not matter.
ClusterName=testcluster
SlurmctldHost=localhost
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=root
SlurmdUser=root
# Use our private munged (AuthInfo is read by both auth/munge and cred/munge).
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge/munge.sock
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
# No cgroups anywhere: track job processes by walking /proc, no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
# One job per CPU.
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
# Start batch jobs at once instead of batching them up (cuts array latency ~5 s -> ~2 s).
SchedulerParameters=batch_sched_delay=0
MpiDefault=none
# A node that was DOWN comes back by itself when slurmd registers again.
ReturnToService=2
# No slurmdbd: sacct does not work; use squeue / scontrol show job.
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
# Finished jobs stay visible to scontrol for 30 s (default 300).
MinJobAge=30
# More CPUs than the machine has may be configured (SLURM_TEST_CPUS): tests run several jobs at once.
SlurmdParameters=config_overrides
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$CPUS State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF

    # Foreground flags: munged -F, slurmctld -D (-c: ignore any old state), slurmd -D.
    start munged munged -F --key-file="$DIR/munge/munge.key" \
        --socket="$DIR/munge/munge.sock" --pid-file="$DIR/munge/munged.pid" \
        --seed-file="$DIR/munge/seed" --log-file="$DIR/log/munged.log"
    local i
    for i in $(seq 50); do [ -S "$DIR/munge/munge.sock" ] && break; sleep 0.1; done
    [ -S "$DIR/munge/munge.sock" ] || { tails; SLURM_TEST_KEEP=1 cmd_down; die "munged did not start"; }

    start slurmctld slurmctld -D -c -f "$CONF"
    start slurmd slurmd -D -f "$CONF" -N localhost   # -N: node name != hostname

    # Ready when the node reports idle (usually ~1 s).
    local st=""
    for i in $(seq 150); do
        st=$(sinfo -h -n localhost -o %T 2>/dev/null || true)
        [ "$st" = idle ] && break
        sleep 0.2
    done
    if [ "$st" != idle ]; then
        tails; SLURM_TEST_KEEP=1 cmd_down
        die "node not idle after 30 s (state: '${st:-no answer}'); logs kept in $DIR/log"
    fi
    echo "slurm up: export SLURM_CONF=$CONF"
}

cmd_down() {
    if [ -f "$CONF" ] && [ -f "$DIR/pids/slurmctld" ] && alive "$(cat "$DIR/pids/slurmctld")"; then
        # Cancel every job first, so slurmd kills the job processes itself.
        squeue -h -o %i 2>/dev/null | xargs -r scancel 2>/dev/null || true
        local i
        for i in $(seq 50); do [ -z "$(squeue -h 2>/dev/null)" ] && break; sleep 0.1; done
    fi
    stop slurmd
    stop slurmctld
    stop munged
    if [ "${SLURM_TEST_KEEP:-0}" != 1 ]; then rm -rf "$DIR"; fi
}

cmd_status() {
    local n
    for n in munged slurmctld slurmd; do
        if [ -f "$DIR/pids/$n" ] && alive "$(cat "$DIR/pids/$n")"; then
            echo "$n: running, pid $(cat "$DIR/pids/$n")"
        else
            echo "$n: not running"
        fi
    done
    sinfo 2>/dev/null && squeue 2>/dev/null || true
}

case ${1:-} in
    install) cmd_install ;;
    up)      cmd_up ;;
    down)    cmd_down ;;
    status)  cmd_status ;;
    env)     echo "export SLURM_CONF=$CONF" ;;
    *)       sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 2 ;;
esac
