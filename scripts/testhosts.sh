#!/usr/bin/env bash
# testhosts.sh -- N throw-away SSH hosts on this machine, for deploying ticketfarm to.
#
# A "host" is a network namespace with one veth (eth0 inside), an address on a
# private test /24, its own hostname, and its own sshd (own host key) that
# accepts one generated root key.  The root-namespace ends of the veths hang
# on a bridge holding the .1 address, so ansible-playbook and a ticketfarm
# master started normally reach every host by IP, and the hosts reach .1.
# Hosts get no default route: nothing inside one reaches past the test /24.
#
# The filesystem is shared, so each host gets its own directory, passed to
# Ansible as the host variable `host_root`; the playbooks put the venv,
# config, pid files and work dirs under it.
#
# Usage (as root):
#   testhosts.sh up               create the hosts; writes inventory.ini, ansible.cfg
#   testhosts.sh down             kill everything inside the hosts, delete it all
#   testhosts.sh status           one line per host: address, sshd pid, link, #procs
#   testhosts.sh cut HOST         root-side veth down: the host's packets vanish
#   testhosts.sh heal HOST        veth up again
#   testhosts.sh exec HOST CMD..  run CMD in HOST's namespaces (as its sshd sees them)
#   testhosts.sh ssh HOST CMD..   run CMD on HOST over SSH, the way Ansible does
#
# Environment (saved by `up` in $TH_DIR/params; later calls only need TH_DIR):
#   TH_DIR    state directory, deleted by `down`       /tmp/ticketfarm-testhosts
#   TH_COUNT  number of hosts                          3
#   TH_NET    first three octets of the test /24       10.231.17
#   TH_TAG    short prefix for bridge/netns/veth names tf   (-> tfbr, tf-h1, tfv-h1)
#   TH_KEEP   1: `down` keeps TH_DIR (logs) instead of deleting it
#
# Needs: iproute2, openssh-server, openssh-client, util-linux (unshare, nsenter).

set -euo pipefail

TH_DIR=${TH_DIR:-/tmp/ticketfarm-testhosts}
if [[ ${1:-} != up && -f $TH_DIR/params ]]; then
    # shellcheck disable=SC1091
    . "$TH_DIR/params"
fi
TH_COUNT=${TH_COUNT:-3}
TH_NET=${TH_NET:-10.231.17}
TH_TAG=${TH_TAG:-tf}
TH_KEEP=${TH_KEEP:-0}

BRIDGE=${TH_TAG}br
SSH_OPTS=(-o UserKnownHostsFile="$TH_DIR/known_hosts" -o StrictHostKeyChecking=yes
          -o IdentitiesOnly=yes -o BatchMode=yes -o ConnectTimeout=5
          -i "$TH_DIR/client_key")

fail()    { echo "testhosts: $*" >&2; exit 1; }
log()     { echo "testhosts: $*" >&2; }
hosts()   { local i; for i in $(seq 1 "$TH_COUNT"); do echo "h$i"; done; }
netns()   { echo "$TH_TAG-$1"; }                 # h2 -> tf-h2
veth()    { echo "${TH_TAG}v-$1"; }              # h2 -> tfv-h2 (root-side end)
addr()    { echo "$TH_NET.$((10 + ${1#h}))"; }   # h2 -> x.y.z.12
hostdir() { echo "$TH_DIR/hosts/$1"; }
sshd_pid() { cat "$(hostdir "$1")/sshd.pid" 2>/dev/null || true; }
known()   { [[ $1 =~ ^h[0-9]+$ ]] && (( ${1#h} >= 1 && ${1#h} <= TH_COUNT )) \
                || fail "no such host: $1 (have: $(hosts | tr '\n' ' '))"; }

# sshd daemonises and every SSH session is its child, so sessions inherit the
# host's network namespace, the mount namespace `ip netns exec` makes, and the
# UTS namespace (hostname) unshared here.
start_sshd() {
    local h=$1 d
    d=$(hostdir "$h")
    rm -f "$d/sshd.pid"
    ip netns exec "$(netns "$h")" unshare --uts sh -c \
        "hostname '$h' && exec /usr/sbin/sshd -f '$d/sshd_config' -E '$d/sshd.log'"
    local ip try
    ip=$(addr "$h")
    for try in $(seq 1 50); do
        if timeout 1 bash -c "exec 3<>/dev/tcp/$ip/22" 2>/dev/null; then return 0; fi
        sleep 0.1
    done
    fail "sshd of $h did not listen on $ip:22; see $d/sshd.log"
}

write_sshd_config() {
    local h=$1 d
    d=$(hostdir "$h")
    cat > "$d/sshd_config" <<EOF
# sshd of test host $h ($(addr "$h")), written by testhosts.sh
ListenAddress $(addr "$h"):22
HostKey $d/host_key
PidFile $d/sshd.pid
AuthorizedKeysFile $TH_DIR/client_key.pub
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
# key files live under /tmp, whose mode StrictModes rejects
StrictModes no
UsePAM no
UseDNS no
MaxStartups 100:30:200
# SHLVL=1: bash run by sshd then skips ~/.bashrc, the controller's (the hosts share its filesystem):
# an interactive setup there (e.g. pyenv init, which rehashes under a lock) would slow every Ansible task
SetEnv TESTHOST=$h SHLVL=1
Subsystem sftp /usr/lib/openssh/sftp-server
LogLevel VERBOSE
EOF
    /usr/sbin/sshd -t -f "$d/sshd_config"
}

write_inventory() {
    local h
    {
        echo "# test hosts made by scripts/testhosts.sh; see inventory.example for the variables"
        echo "[slaves]"
        for h in $(hosts); do
            echo "$h ansible_host=$(addr "$h") host_root=$(hostdir "$h")/root"
        done
        echo
        echo "[all:vars]"
        echo "ansible_user=root"
        echo "ansible_ssh_private_key_file=$TH_DIR/client_key"
        echo "ansible_python_interpreter=/usr/bin/python3"
        echo "ticketfarm_master=tcp://$TH_NET.1:5555"
    } > "$TH_DIR/inventory.ini"
    cat > "$TH_DIR/ansible.cfg" <<EOF
# use with ANSIBLE_CONFIG=$TH_DIR/ansible.cfg
[defaults]
inventory = $TH_DIR/inventory.ini
host_key_checking = True
forks = 10
timeout = 10
interpreter_python = /usr/bin/python3
[ssh_connection]
ssh_args = -o UserKnownHostsFile=$TH_DIR/known_hosts -o StrictHostKeyChecking=yes -o IdentitiesOnly=yes -o ConnectTimeout=5 -o ServerAliveInterval=2 -o ServerAliveCountMax=3 -o ControlMaster=auto -o ControlPersist=30s
control_path_dir = $TH_DIR/cp
pipelining = True
EOF
}

cmd_up() {
    [[ $(id -u) == 0 ]] || fail "must run as root (creates network namespaces)"
    [[ -e $TH_DIR/params ]] && fail "$TH_DIR is in use; run '$0 down' first"
    ip link show "$BRIDGE" >/dev/null 2>&1 && fail "bridge $BRIDGE exists; another run is up?"
    (( ${#BRIDGE} <= 15 && ${#TH_TAG} + 3 + ${#TH_COUNT} + 2 <= 15 )) || fail "TH_TAG too long"
    mkdir -p "$TH_DIR/hosts" "$TH_DIR/cp"
    declare -p TH_COUNT TH_NET TH_TAG > "$TH_DIR/params"
    trap 'log "up failed; tearing down"; cmd_down >&2' EXIT

    install -d -m 0755 /run/sshd        # sshd's privilege-separation dir
    ssh-keygen -q -t ed25519 -N '' -C ticketfarm-testhosts -f "$TH_DIR/client_key"
    : > "$TH_DIR/known_hosts"

    ip link add "$BRIDGE" type bridge
    ip addr add "$TH_NET.1/24" dev "$BRIDGE"
    ip link set "$BRIDGE" up

    local h ns d
    for h in $(hosts); do
        ns=$(netns "$h"); d=$(hostdir "$h")
        mkdir -p "$d/root"
        ip netns add "$ns"
        ip link add "$(veth "$h")" type veth peer name eth0 netns "$ns"
        ip link set "$(veth "$h")" master "$BRIDGE" up
        ip -n "$ns" link set lo up
        ip -n "$ns" addr add "$(addr "$h")/24" dev eth0
        ip -n "$ns" link set eth0 up
        ssh-keygen -q -t ed25519 -N '' -C "$h" -f "$d/host_key"
        echo "$(addr "$h") $(cut -d' ' -f1,2 "$d/host_key.pub")" >> "$TH_DIR/known_hosts"
        write_sshd_config "$h"
        start_sshd "$h"
    done
    write_inventory
    trap - EXIT
    log "$TH_COUNT hosts up on $TH_NET.0/24; inventory $TH_DIR/inventory.ini," \
        "ANSIBLE_CONFIG=$TH_DIR/ansible.cfg"
}

cmd_down() {
    local h sock try left
    # Ansible's persistent SSH masters live in the root namespace: close them
    # first, or a later call through a dead host's socket hangs.
    for sock in "$TH_DIR"/cp/*; do
        [[ -S $sock ]] && ssh -o ControlPath="$sock" -O exit x >/dev/null 2>&1 || true
    done
    # Every process in a host's network namespace is ours (sshd, the slaves
    # and supervisors the playbooks started): TERM, wait up to 2 s, KILL.
    for h in $(hosts); do
        ip netns pids "$(netns "$h")" 2>/dev/null | xargs -r kill -TERM 2>/dev/null || true
    done
    for try in $(seq 1 20); do
        left=0
        for h in $(hosts); do
            [[ -n $(ip netns pids "$(netns "$h")" 2>/dev/null) ]] && left=1
        done
        (( left )) || break
        sleep 0.1
    done
    for h in $(hosts); do
        ip netns pids "$(netns "$h")" 2>/dev/null | xargs -r kill -KILL 2>/dev/null || true
        # veth before netns: namespace deletion is asynchronous
        ip link del "$(veth "$h")" 2>/dev/null || true
        ip netns del "$(netns "$h")" 2>/dev/null || true
    done
    ip link del "$BRIDGE" 2>/dev/null || true
    # only delete a directory this script set up (guards against TH_DIR typos)
    if [[ $TH_KEEP != 1 && -f $TH_DIR/params ]]; then rm -rf "$TH_DIR"; fi
    log "down"
}

cmd_status() {
    local h
    for h in $(hosts); do
        printf '%-4s %-15s sshd=%-8s link=%-5s procs=%s\n' "$h" "$(addr "$h")" \
            "$(sshd_pid "$h")" \
            "$(ip -br link show "$(veth "$h")" 2>/dev/null | awk '{print $2}')" \
            "$(ip netns pids "$(netns "$h")" 2>/dev/null | wc -l)"
    done
}

case ${1:-} in
    up)     cmd_up ;;
    down)   cmd_down ;;
    status) cmd_status ;;
    cut)    known "${2:-}"; ip link set "$(veth "$2")" down ;;
    heal)   known "${2:-}"; ip link set "$(veth "$2")" up ;;
    exec)   known "${2:-}"; h=$2; shift 2
            nsenter -t "$(sshd_pid "$h")" -n -m -u -- "$@" ;;
    ssh)    known "${2:-}"; h=$2; shift 2
            ssh "${SSH_OPTS[@]}" "root@$(addr "$h")" "$@" ;;
    *)      sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 2 ;;
esac
