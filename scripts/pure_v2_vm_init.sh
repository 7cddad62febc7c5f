#!/bin/busybox sh
# The guest's init for scripts/pure_v2_vm.sh: a pure cgroup v2 host in a KVM VM.
#
# Stage 1 (PID 1 in the initramfs, no arguments): load the 9p/overlay modules,
# mount the host's / (9p, read-only) as the lower layer of an overlay whose
# upper is a tmpfs (so the guest may write anywhere: nothing reaches the
# host), fresh tmpfs on /tmp, /run, /dev/shm, then switch_root into it and
# run stage 2 from /run/vm (this busybox, this script, the job).
#
# Stage 2 (PID 1 in the new root, argument "stage2"): mount cgroup2 at
# /sys/fs/cgroup (the kernel was booted with cgroup_no_v1=all: no v1
# hierarchy at all), reproduce the container situation of
# shared/notes/pure-cgroup-v2.md:
#   root:                    subtree_control +cpu +memory +pids +io +cpuset
#   /process_api:            subtree_control +memory only
#   /process_api/<id>:       holds the shell that runs the job and 2 sleeps
# then run the job there as root, print the exit marker and power off.
#
# The kernel command line carries bavm.job=<host dir>: job.sh (cd + the
# command, already quoted) and marker (the token of the exit line), read from
# the 9p lower before /tmp is covered.

BB=/bin/busybox
say() { echo "[vm-init] $*"; }
die() { echo "[vm-init] FATAL: $*"; $BB sync; $BB poweroff -f; echo o > /proc/sysrq-trigger; exit 1; }

stage1() {
    $BB --install -s /bin
    export PATH=/bin
    mkdir -p /proc /sys /dev /lower /rw /newroot
    mount -t proc proc /proc
    mount -t sysfs sysfs /sys
    mount -t devtmpfs devtmpfs /dev
    for m in $(cat /modules.order); do
        insmod "/modules/$m.ko" || die "insmod $m"
    done
    job=""
    for w in $(cat /proc/cmdline); do
        case "$w" in bavm.job=*) job="${w#bavm.job=}" ;; esac
    done
    [ -n "$job" ] || die "no bavm.job= on the kernel command line"

    mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose hostroot /lower \
        || die "mount 9p hostroot"
    mount -t tmpfs -o mode=755 rw /rw
    mkdir -p /rw/upper /rw/work
    if mount -t overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work overlay /newroot; then
        say "root: overlay (host / over 9p, read-only) + tmpfs upper"
    else
        # Fallback: the read-only 9p root with tmpfs where the tests write.
        say "overlay over 9p refused: read-only 9p root, tmpfs on /tmp /run /root"
        mount --bind /lower /newroot
        mount -t tmpfs -o mode=700 root /newroot/root
    fi
    mount -t tmpfs -o mode=1777 tmp /newroot/tmp
    mount -t tmpfs -o mode=755 run /newroot/run
    mkdir -p /newroot/run/vm
    cp /bin/busybox /init /newroot/run/vm/ || die "copy busybox"
    cp "/lower$job/job.sh" "/lower$job/marker" /newroot/run/vm/ || die "read the job from $job"
    for d in proc sys dev; do
        mount --move "/$d" "/newroot/$d" || die "move /$d"
    done
    exec switch_root /newroot /run/vm/busybox sh /run/vm/init stage2
}

stage2() {
    BB=/run/vm/busybox
    export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
    $BB mkdir -p /dev/pts /dev/shm
    $BB mount -t devpts -o mode=620,ptmxmode=666 devpts /dev/pts
    $BB mount -t tmpfs -o mode=1777 shm /dev/shm
    $BB stty -onlcr 2>/dev/null
    $BB mount -t cgroup2 -o nsdelegate cgroup2 /sys/fs/cgroup || die "mount cgroup2"
    # Nothing of cgroup v1 is mounted (and cgroup_no_v1=all forbids it).
    if $BB grep -q ' - cgroup ' /proc/self/mountinfo; then die "a cgroup v1 hierarchy is mounted"; fi
    cg=/sys/fs/cgroup
    echo "+cpu +memory +pids +io +cpuset" > $cg/cgroup.subtree_control || die "root subtree_control"
    id=$($BB cat /proc/sys/kernel/random/uuid | $BB tr -d -- -)
    id=${id%????????????????}
    $BB mkdir -p $cg/process_api/$id
    echo "+memory" > $cg/process_api/cgroup.subtree_control || die "process_api subtree_control"
    say "kernel $($BB uname -r); cgroup2 only; root subtree_control [$($BB cat $cg/cgroup.subtree_control)]"
    say "/process_api subtree_control [$($BB cat $cg/process_api/cgroup.subtree_control)];" \
        "job cgroup /process_api/$id controllers [$($BB cat $cg/process_api/$id/cgroup.controllers)]"
    export HOME=/tmp TMPDIR=/tmp LANG=C.UTF-8 TERM=dumb PYTHONDONTWRITEBYTECODE=1 \
        PYTHONUNBUFFERED=1 BRANCHAGENT_VM=1
    # The job's shell joins the cgroup first, then 2 sleeps are forked there
    # (the cgroup holds processes, as under a process manager), then the job.
    $BB sh -c 'echo $$ > "$1/cgroup.procs" || exit 125
               /bin/sleep 100000 & s1=$!; /bin/sleep 100000 & s2=$!
               sh=/bin/sh; [ -x $sh ] || sh="/run/vm/busybox sh"
               cd / && $sh /run/vm/job.sh; rc=$?
               kill $s1 $s2 2>/dev/null; exit $rc' job "$cg/process_api/$id"
    rc=$?
    $BB sync
    echo "$($BB cat /run/vm/marker)=$rc"
    $BB poweroff -f
    echo o > /proc/sysrq-trigger
}

case "${1:-}" in
    stage2) stage2 ;;
    *) stage1 ;;
esac
