#!/bin/sh
# /init of a vm-test guest (cargo +stable xtask vm-test, xtask/src/vmtest/): makes the guest
# look like the hosts the integration tests were written on, runs each test executable of
# /vmtest/plan, then powers off.
#
# The kernel's console is ttyS0: the host watches it for soft lockups, RCU stalls and panics.
# Everything below goes to ttyS1, in lines the host parses (xtask/src/vmtest/matrix.rs):
#   VMTEST-START <uname -r> uptime=<s>
#   VMTEST-INFO <fact about this guest>
#   VMTEST-BEGIN <executable> uptime=<s>
#   ... libtest's own output ...
#   VMTEST-STDERR <executable>       (what its child processes wrote on stderr, when anything)
#   VMTEST-END <executable> rc=<exit code> uptime=<s>     (rc 137: killed by the time limit)
#   VMTEST-DONE uptime=<s>
/bin/busybox mkdir -p /bin /sbin /usr/bin /usr/sbin
/bin/busybox --install -s /bin
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root LANG=C.UTF-8 TERM=linux

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts # tmux's terminals
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run # ip netns keeps its namespaces in /run/netns
mount -t securityfs securityfs /sys/kernel/security
mount -t bpf bpf /sys/fs/bpf
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount -t tracefs tracefs /sys/kernel/tracing
# A test puts twtrace in a memory cgroup of its own (a limit the ring buffer exceeds): a systemd
# host delegates the memory controller; here the root cgroup must enable it for its children.
echo +memory >/sys/fs/cgroup/cgroup.subtree_control
ip link set lo up

exec </dev/null >/dev/ttyS1 2>&1
up() { cut -d' ' -f1 /proc/uptime; }
echo "VMTEST-START $(uname -r) uptime=$(up)"
echo "VMTEST-INFO lockdown: $(cat /sys/kernel/security/lockdown 2>&1)"
while read -r m <&3; do
  if err=$(insmod "/lib/modules/vmtest/$m.ko" 2>&1); then
    echo "VMTEST-INFO module $m loaded"
  else
    echo "VMTEST-INFO module $m not loaded: $err"
  fi
done 3</vmtest/modules
for s in net.ipv4.tcp_max_tw_buckets net.ipv4.tcp_tw_reuse net.ipv4.ip_local_port_range; do
  echo "VMTEST-INFO $s = $(sysctl -n $s 2>&1 | tr '\t' ' ')"
done

cd /tmp
while read -r name limit args <&3; do
  echo "VMTEST-BEGIN $name uptime=$(up)"
  echo "<5>vmtest: $name begins" >/dev/kmsg
  # libtest prints its report on stdout; what child processes write on stderr comes after it,
  # so that it never splits a "test NAME ... ok" line.
  timeout -s KILL "$limit" "/opt/twtrace/build/deps/$name" $args 2>"/tmp/$name.stderr"
  rc=$?
  # A killed executable leaves libtest's "test NAME ... " without its newline.
  echo
  if [ -s "/tmp/$name.stderr" ]; then
    echo "VMTEST-STDERR $name"
    cat "/tmp/$name.stderr"
  fi
  # Whatever a killed executable left running (twtrace, servers, tmux) and its network
  # namespaces must not meet the next one: the tests count the programs loaded in the kernel.
  kill -9 -1 2>/dev/null
  ip -all netns delete 2>/dev/null
  echo "<5>vmtest: $name ends, exit code $rc" >/dev/kmsg
  echo "VMTEST-END $name rc=$rc uptime=$(up)"
done 3</vmtest/plan
echo "VMTEST-DONE uptime=$(up)"
sync
poweroff -f
# Should poweroff fail, the kernel's own power-off; qemu ends either way (-no-reboot).
echo o >/proc/sysrq-trigger
sleep 10
