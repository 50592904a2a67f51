#!/bin/bash
# A real one-node Slurm on this machine, for the end-to-end tests and benchmarks (root only).
#
#   scripts/slurm-local.sh start    install (if missing), configure, start; wait until the node is idle
#   scripts/slurm-local.sh status   exit 0 iff the node is usable (idle / mixed / allocated)
#   scripts/slurm-local.sh stop     stop the daemons this script started (by their pid files)
#
# Debian 12's slurm-wlm 22.05 on a cgroup v1 hybrid host (see docs/SLURM.md): cgroup/v1 with
# ConstrainDevices, 4 fake GPUs (character devices with NVIDIA's major 195), two partitions for
# preemption tests (`debug`, the default, PriorityTier=10; `standby`, PriorityTier=1, jobs there are
# requeued when a `debug` job needs their resources). KillWait is 5 s (Slurm's default is 30 s) so
# tests that wait for SIGKILL are short.
#
# The configuration goes to /etc/slurm (where every Slurm command looks without SLURM_CONF); a
# slurm.conf this script did not write is never overwritten. State, logs and the fake devices live
# in WATCHDOG_LLM_SLURM_DIR (default /var/tmp/watchdog-llm-slurm). Nothing is ever killed by name.
set -euo pipefail

D=${WATCHDOG_LLM_SLURM_DIR:-/var/tmp/watchdog-llm-slurm}
ETC=/etc/slurm
MARK="# written by watchdog-llm scripts/slurm-local.sh"
NGPU=4
WAIT_S=${WATCHDOG_LLM_SLURM_WAIT:-30}
H=$(hostname -s)

die() { echo "slurm-local: $*" >&2; exit 1; }
say() { echo "slurm-local: $*" >&2; }

alive() { # alive PIDFILE: the pid in it names a live process
    local pid
    [[ -s $1 ]] || return 1
    pid=$(<"$1")
    [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null
}

node_state() { timeout 10 sinfo -h -n "$H" -o %T 2>/dev/null | head -n1; }

usable() {
    local s
    s=$(node_state) || return 1
    [[ $s =~ ^(idle|mixed|allocated|completing|planned)$ ]]
}

install_packages() {
    local need=()
    command -v slurmctld >/dev/null || need+=(slurmctld)
    command -v slurmd >/dev/null || need+=(slurmd)
    command -v sbatch >/dev/null || need+=(slurm-client)
    command -v munged >/dev/null || need+=(munge)
    ((${#need[@]})) || return 0
    say "installing ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null || die "apt-get update failed"
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null || die "apt-get install ${need[*]} failed"
}

write_config() { # into $1 (a directory)
    local out=$1 conf mem
    # `slurmd -C` prints this node's real layout; RealMemory: 90 % of MemTotal so slurmd never
    # reports less than configured (which would drain the node).
    conf=$(slurmd -C | head -n1 | sed -e 's/^NodeName=[^ ]* //' -e 's/ RealMemory=[0-9]*//')
    mem=$(awk '/^MemTotal:/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)
    cat >"$out/slurm.conf" <<EOF
$MARK
ClusterName=wdtest
SlurmctldHost=$H
SlurmUser=slurm
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$D/state/ctld
SlurmdSpoolDir=$D/state/slurmd
SlurmctldPidFile=$D/state/slurmctld.pid
SlurmdPidFile=$D/state/slurmd.pid
SlurmctldLogFile=$D/log/slurmctld.log
SlurmdLogFile=$D/log/slurmd.log
ProctrackType=proctrack/cgroup
TaskPlugin=task/cgroup
PrologFlags=Contain
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
ReturnToService=2
MpiDefault=none
MailProg=/bin/true
# Tests wait for SIGKILL after SIGTERM: 5 s instead of the default 30 s.
KillWait=5
# Preemption by partition priority: a job in debug (tier 10) requeues jobs in standby (tier 1).
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
GresTypes=gpu
NodeName=$H $conf RealMemory=$mem Gres=gpu:$NGPU State=UNKNOWN
PartitionName=debug Nodes=$H Default=YES MaxTime=INFINITE State=UP PriorityTier=10
PartitionName=standby Nodes=$H MaxTime=INFINITE State=UP PriorityTier=1 GraceTime=0
EOF
    cat >"$out/cgroup.conf" <<EOF
$MARK
# These hosts mount cgroups in hybrid mode: cgroup/v2 fails ("Hybrid mode is not supported").
CgroupPlugin=cgroup/v1
CgroupMountpoint=/sys/fs/cgroup
ConstrainCores=yes
ConstrainRAMSpace=yes
ConstrainDevices=yes
EOF
    cat >"$out/gres.conf" <<EOF
$MARK
# Fake GPUs: character devices with NVIDIA's major number. A GPU without File= drains the node.
AutoDetect=off
NodeName=$H Name=gpu File=$D/dev/fakegpu[0-$((NGPU - 1))]
EOF
}

start_munge() {
    if [[ -S /run/munge/munge.socket.2 ]] && munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
        return 0 # a working munged (ours or the system's): leave it alone
    fi
    if [[ ! -s /etc/munge/munge.key ]]; then
        if command -v mungekey >/dev/null; then
            mungekey --create --keyfile=/etc/munge/munge.key
        else
            dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
        fi
        chown munge:munge /etc/munge/munge.key
        chmod 0400 /etc/munge/munge.key
    fi
    install -d -o munge -g munge -m 0755 /run/munge /var/lib/munge /var/log/munge
    runuser -u munge -- /usr/sbin/munged --force || die "munged did not start (see /var/log/munge/munged.log)"
    cp /run/munge/munged.pid "$D/run/munged.pid" # ours to stop
    for _ in $(seq 50); do
        munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    die "munged is running but munge/unmunge fails (see /var/log/munge/munged.log)"
}

start() {
    [[ $(id -u) == 0 ]] || die "must run as root (it installs packages and starts slurmd)"
    install_packages
    mkdir -p "$D"/{state/ctld,state/slurmd,log,dev,run}
    chown slurm: "$D/state/ctld" "$D/log" 2>/dev/null || die "no user 'slurm' (is slurmctld installed?)"
    for i in $(seq 0 $((NGPU - 1))); do
        [[ -c $D/dev/fakegpu$i ]] || mknod -m 666 "$D/dev/fakegpu$i" c 195 "$i"
    done
    if ! getent hosts "$H" >/dev/null; then
        echo "127.0.0.1 $H" >>/etc/hosts
        say "added '127.0.0.1 $H' to /etc/hosts"
    fi

    local new changed=0 f
    new=$(mktemp -d)
    write_config "$new"
    mkdir -p "$ETC"
    if [[ -e $ETC/slurm.conf ]] && ! grep -qxF "$MARK" "$ETC/slurm.conf"; then
        rm -rf "$new"
        die "$ETC/slurm.conf was not written by this script: not touching it"
    fi
    for f in slurm.conf cgroup.conf gres.conf; do
        cmp -s "$new/$f" "$ETC/$f" || { install -m 0644 "$new/$f" "$ETC/$f"; changed=1; }
    done
    rm -rf "$new"

    if ((changed)) && { alive "$D/state/slurmctld.pid" || alive "$D/state/slurmd.pid"; }; then
        say "configuration changed: restarting Slurm"
        stop_slurm
    fi
    start_munge
    if ! alive "$D/state/slurmctld.pid"; then
        slurmctld || die "slurmctld did not start (see $D/log/slurmctld.log)"
    fi
    if ! alive "$D/state/slurmd.pid"; then
        slurmd || die "slurmd did not start (see $D/log/slurmd.log)"
    fi

    local s="" t
    for t in $(seq $((WAIT_S * 10))); do
        s=$(node_state || true)
        case $s in
        idle | mixed | allocated | completing | planned) break ;;
        *drain* | down* | fail*)
            # ReturnToService=2 brings a node back on registration; a node drained by an earlier
            # configuration (e.g. missing GPU files) needs this once.
            if ((t % 20 == 1)); then
                timeout 10 scontrol update nodename="$H" state=resume 2>/dev/null || true
            fi
            ;;
        esac
        sleep 0.1
    done
    if ! usable; then
        local why
        why=$(timeout 10 sinfo -h -R -n "$H" -o '%E' 2>/dev/null | head -n1)
        die "node $H is '${s:-unknown}' after ${WAIT_S} s${why:+ (reason: $why)}; see $D/log/"
    fi
    say "node $H is $s (partitions: debug (default), standby)"
}

stop_pidfile() { # stop_pidfile PIDFILE NAME
    local pid
    alive "$1" || return 0
    pid=$(<"$1")
    kill -TERM "$pid"
    for _ in $(seq 100); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    say "$2 ($pid) still running after 10 s: SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
}

stop_slurm() {
    stop_pidfile "$D/state/slurmd.pid" slurmd
    stop_pidfile "$D/state/slurmctld.pid" slurmctld
}

stop() {
    stop_slurm
    # munged only if this script started it (its pid file copy says so).
    if [[ -s $D/run/munged.pid && -s /run/munge/munged.pid ]] && [[ $(<"$D/run/munged.pid") == $(</run/munge/munged.pid) ]]; then
        stop_pidfile /run/munge/munged.pid munged
    fi
    rm -f "$D/run/munged.pid"
}

status() {
    command -v sinfo >/dev/null || die "Slurm is not installed (run: $0 start)"
    local s
    s=$(node_state || true)
    if usable; then
        echo "slurm-local: node $H is $s"
        return 0
    fi
    die "node $H is '${s:-unreachable}' (run: $0 start)"
}

case ${1:-} in
start) start ;;
stop) stop ;;
status) status ;;
restart) stop && start ;;
*) echo "usage: $0 start|stop|status|restart" >&2; exit 2 ;;
esac
