#!/bin/sh
# PID 1 of a kernel booted by the kernel matrix (tests/tests/kernels.rs). It builds a
# simulated node (the root namespace, with a veth "ENI" eth0, and a VPC namespace behind
# it), runs the release agent, drives known traffic and prints blocks between
# "@@ BEGIN name" and "@@ END name" on the serial console. The host test asserts on them.
# IPv4 only: IPv6 router solicitations and listener reports would add frees on eth0 that
# a kernel without drop reasons (5.10) counts as drops.

export PATH=/usr/local/bin:/bin
# Busybox's shell prefers its own applets to PATH: iproute2's ip and tc by full path.
ip() { /usr/local/bin/ip "$@"; }
tc() { /usr/local/bin/tc "$@"; }
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t bpf bpf /sys/fs/bpf
mount -t securityfs securityfs /sys/kernel/security 2>/dev/null
mkdir -p /run/netns /tmp

mark() { echo "@@ $*"; }
phase() { mark PHASE "$1 $(cut -d' ' -f1 /proc/uptime)"; }
finish() {
    mark DONE
    poweroff -f
}
trap finish EXIT

mark KERNEL "$(uname -r)"
mark LOCKDOWN "$(cat /sys/kernel/security/lockdown 2>/dev/null || echo absent)"
mark CPUS "$(nproc)"

AGENT_ARGS="--device eth0 --listen 127.0.0.1:9435 --imds-endpoint http://127.0.0.1:1
    --udp-timeout 600s --udp-stream-timeout 600s"

get() { nettool http-get 127.0.0.1:9435 "$1" 2>/dev/null; }

# Waits up to 60 s (the emulated CPU is slow) for /metrics to hold a line matching $1.
wait_for() {
    n=0
    until get /metrics | grep -q "$1"; do
        n=$((n + 1))
        [ $n -gt 300 ] && { mark TIMEOUT "$1"; return 1; }
        sleep 0.2
    done
}

start_agent() {
    # shellcheck disable=SC2086
    monitor $AGENT_ARGS >/tmp/agent.log 2>&1 &
    AGENT=$!
    n=0
    until [ "$(get /healthz | head -n 1)" = 200 ]; do
        n=$((n + 1))
        if [ $n -gt 300 ] || ! kill -0 $AGENT 2>/dev/null; then
            mark BEGIN agent-log-failed-start
            cat /tmp/agent.log
            mark END agent-log-failed-start
            return 1
        fi
        sleep 0.2
    done
}

stop_agent() {
    kill -TERM $AGENT
    wait $AGENT
    mark AGENT-EXIT $?
}

# /metrics and /readyz as blocks "<name>" and "<name>-readyz".
dump() {
    mark BEGIN "$1"
    get /metrics | grep '^eni_monitor_'
    mark END "$1"
    mark BEGIN "$1-readyz"
    get /readyz
    mark END "$1-readyz"
}

# The classifiers in the kernel: cls_bpf filters on eth0, and programs loaded.
classifiers() {
    mark BEGIN "$1"
    for dir in ingress egress; do
        # One line per filter; tc names the program twice on it.
        tc filter show dev eth0 "$dir" 2>/dev/null |
            sed -n "s/.*\\(tc_[a-z]*\\).*/filter $dir \\1/p"
    done
    bpftool prog show 2>/dev/null | grep -o 'name tc_[a-z]*' | sed 's/^name /loaded /'
    mark END "$1"
}

# What the verifier walked of each classifier on this kernel (the agent logs it).
verifier() {
    mark BEGIN verifier
    sed -n 's/.*loaded \(tc_[a-z]*\): the verifier walked \([0-9]*\) instructions.*/\1 \2/p' /tmp/agent.log
    mark END verifier
}

# The simulated node, with veth only: no clsact or cls_bpf yet.
insmod /lib/modules/veth.ko
sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1
ip link set lo up
ip netns add vpc
ip netns exec vpc sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1
ip link add eth0 type veth peer name vpc0
ip link set vpc0 netns vpc
ip addr add 10.0.0.1/24 dev eth0
ip link set eth0 up
ip -n vpc link set lo up
ip -n vpc addr add 10.0.0.2/24 dev vpc0
ip -n vpc link set vpc0 up

phase "phase-1"
# The kernel memory of the agent's maps, for the per-CPU growth the test measures.
if grep -q 'em.scenario=memory' /proc/cmdline; then
    start_agent || exit 1
    sleep 1
    dump memory
    verifier
    stop_agent
    exit 0
fi

# Phase 1: without the modules a kernel before TCX needs, the classifiers cannot attach,
# and the agent must say so rather than serve a silent gap.
start_agent || exit 1
dump no-modules
verifier
stop_agent

insmod /lib/modules/sch_ingress.ko
insmod /lib/modules/cls_bpf.ko

ip netns exec vpc nettool dns-server 10.0.0.2:53 &
ip netns exec vpc nettool tcp-server 10.0.0.2:8080 &
ip netns exec vpc nettool udp-sink 10.0.0.2:7000 &
start_agent || exit 1
classifiers classifiers-attached
# The agent's reason, where a classifier did not attach (the verifier's last words).
if [ "$(get /readyz | head -n 1)" != 200 ]; then
    mark BEGIN agent-log-not-ready
    grep -v '^ *[0-9]*: ' /tmp/agent.log | tail -n 60
    mark END agent-log-not-ready
fi

phase "phase-2"
# Phase 2: drops on the node, arriving through eth0 at closed ports: 5 plain, 3 DNS.
ip netns exec vpc nettool udp-send 10.0.0.1:9 5
ip netns exec vpc nettool udp-send 10.0.0.1:53 3
wait_for '^eni_monitor_dns_drops_total{device="eth0",.*} 3'
dump drops

phase "phase-3"
# Phase 3: flows leaving through eth0: 20 UDP flows, 5 held TCP connections.
nettool udp-flows 10.0.0.2:7000 20
nettool tcp-hold 10.0.0.2:8080 5 >/tmp/hold.out &
wait_for '^eni_monitor_tracked_flows{device="eth0",.*protocol="tcp"} 5'
mark BEGIN tcp-hold
cat /tmp/hold.out
mark END tcp-hold
dump flows

phase "phase-4"
# Phase 4: DNS through eth0: one query that has the agent name the resolver (it counts
# as other), then 10 answered NOERROR, 3 NXDOMAIN; then over TCP.
nettool dns-query 10.0.0.2:53 a.example 1 >/dev/null
wait_for '^eni_monitor_dns_resolver_info{resolver="10.0.0.2"'
mark BEGIN dns-client
nettool dns-query 10.0.0.2:53 a.example 10
nettool dns-query 10.0.0.2:53 nx.example 3
mark END dns-client
wait_for '^eni_monitor_dns_responses_total{.*rcode="NXDOMAIN",transport="udp"} 3'
# DNS over TCP: 3, 40 and 200 queries each written at once on a connection of its own
# (pipelined, as a busy forwarder sends them), answered; a connection to an address of
# the VPC where nothing listens on port 53, refused.
ip -n vpc addr add 10.0.0.3/24 dev vpc0
# The classifiers count each segment as it passes, so each client's answers are
# counted by the time it has read them.
mark BEGIN dns-tcp
nettool dns-query-tcp 10.0.0.2:53 a.example 3
nettool dns-query-tcp 10.0.0.2:53 a.example 40
mark END dns-tcp
dump dns-tcp-40
mark BEGIN dns-tcp-200
nettool dns-query-tcp 10.0.0.2:53 a.example 200
nettool tcp-connect 10.0.0.3:53 1
mark END dns-tcp-200
wait_for '^eni_monitor_dns_tcp_connect_failures_total{device="eth0",.*} 1'
dump dns
# Both connections closed: EC2 forgets them 5 s later, and the held ones remain.
wait_for '^eni_monitor_tracked_flows{device="eth0",.*protocol="tcp"} 5'

# Phase 5: a DNS socket on the node that never reads: what does not fit its receive
# queue is a UDP receive-queue drop, and a DNS drop on eth0.
nettool udp-full 10.0.0.1:53 4 >/tmp/full.out &
FULL=$!
sleep 1
ip netns exec vpc nettool udp-send 10.0.0.1:53 200
wait $FULL
mark BEGIN udp-full
cat /tmp/full.out
mark END udp-full
sleep 1
dump overflow

phase "phase-6"
# Another tool's cls_bpf filter on eth0 ingress, its program named as ours (a pin of it),
# at a priority and handle of its own: no agent may remove it.
bpftool prog pin name tc_ingress /sys/fs/bpf/foreign-tc-ingress
tc qdisc add dev eth0 clsact 2>/dev/null
tc filter add dev eth0 ingress prio 7 handle 7 bpf da pinned /sys/fs/bpf/foreign-tc-ingress
# Phase 6: SIGKILL, then a restarted agent: exactly one classifier of ours per hook.
kill -KILL $AGENT
wait $AGENT 2>/dev/null
classifiers classifiers-killed
start_agent || exit 1
# A replaced program is freed after an RCU grace period (the foreign filter holds one).
n=0
while [ "$(bpftool prog show 2>/dev/null | grep -c 'name tc_ingress')" -gt 2 ] && [ $n -lt 50 ]; do
    n=$((n + 1))
    sleep 0.2
done
classifiers classifiers-restarted
mark BEGIN foreign-filter
tc filter show dev eth0 ingress prio 7 | grep -c 'handle 0x7'
mark END foreign-filter
ip netns exec vpc nettool udp-send 10.0.0.1:9 4
wait_for '^eni_monitor_drops_total{device="eth0",.*} '
sleep 1
dump restarted
stop_agent
mark BEGIN agent-log
cat /tmp/agent.log
mark END agent-log

# The probe tests of two CPUs writing one flow at once, where the guest has them (the
# arm64 guests: their memory model lets a CPU reorder what x86's does not).
if [ -x /usr/local/bin/probes ]; then
    phase "probes"
    mark BEGIN probes
    probes --test-threads=1 --exact cpus::two_cpus_beginning_one_flow_begin_it_once \
        cpus::two_cpus_closing_one_flow_at_once_both_fins_stay \
        cpus::a_pass_freeing_slots_under_packets_loses_and_doubles_nothing 2>&1 |
        grep -E '^(test |test result|thread|  left|  right|assertion)'
    mark END probes
fi
