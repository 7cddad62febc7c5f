#!/usr/bin/env bash
# Run a command on a PURE cgroup v2 kernel, in a KVM virtual machine, as root.
#
#   scripts/pure_v2_vm.sh [COMMAND...]
#
# Default COMMAND: <checkout>/.venv/bin/python <checkout>/scripts/pure_v2_probe.py
# (the repository's own venv and probe, wherever this checkout is; a checkout
# without a .venv, such as a git worktree, names its python in COMMAND).
#
# The guest boots Debian's kernel (linux-image-amd64, 6.1) with an initramfs
# made of busybox-static, the 9p/overlay/fuse modules and
# scripts/pure_v2_vm_init.sh. Its root is THIS machine's / shared read-only
# over 9p (virtio) under an overlay with a tmpfs upper: everything is
# visible, every write stays in the guest's memory. cgroup2 is mounted at
# /sys/fs/cgroup and no v1 hierarchy exists (cgroup_no_v1=all). COMMAND runs
# from the current directory in the container situation of
# shared/notes/pure-cgroup-v2.md: in /process_api/<id>, a cgroup that holds
# processes and whose parent delegates only memory (the root delegates
# cpu memory pids io cpuset). Console on stdout; the script exits with
# COMMAND's exit status (124: the VM timed out; 125: no exit status came back).
#
# Needs: /dev/kvm, qemu-system-x86_64 (package qemu-system-x86), apt-get and
# dpkg-deb (the kernel and busybox-static debs are fetched once with
# `apt-get download` into the cache, never installed).
#
# Environment: BAVM_MEM (guest memory, default 3G), BAVM_SMP (default 2),
# BAVM_TIMEOUT (seconds for the whole VM run, default 600), BAVM_VERBOSE=1
# (kernel messages on the console), BAVM_CACHE (default
# ${XDG_CACHE_HOME:-$HOME/.cache}/branchagent-vm).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")
init_script=$here/pure_v2_vm_init.sh
cache=${BAVM_CACHE:-${XDG_CACHE_HOME:-${HOME:-/root}/.cache}/branchagent-vm}
mem=${BAVM_MEM:-3G}
smp=${BAVM_SMP:-2}
vm_timeout=${BAVM_TIMEOUT:-600}
# Modules the init loads (their dependencies are added, in order).
want_modules=(virtio_pci 9pnet_virtio 9p overlay fuse)

die() { echo "pure_v2_vm: $*" >&2; exit 125; }
note() { echo "pure_v2_vm: $*" >&2; }

# --- checks -------------------------------------------------------------
# Accelerator: KVM where the CPU has hardware virtualization (vmx/svm);
# otherwise TCG (software emulation, several times slower but the same
# kernel). A /dev/kvm without vmx/svm is typically PVM (kvm_pvm, nested
# paging-based virtualization): it only runs PVM-enabled guest kernels, and
# Debian's kernel hangs there before its first message.
accel=${BAVM_ACCEL:-auto}
if [ "$accel" = auto ]; then
    if grep -qwE 'vmx|svm' /proc/cpuinfo && [ -e /dev/kvm ]; then
        accel=kvm
    else
        accel=tcg
        why="no vmx/svm CPU flag"
        [ -d /sys/module/kvm_pvm ] && why="/dev/kvm is PVM (kvm_pvm): stock guest kernels cannot boot on it"
        [ -e /dev/kvm ] || why="no /dev/kvm"
        note "software emulation (TCG): $why; BAVM_ACCEL=kvm forces KVM"
    fi
fi
case "$accel" in
    kvm)
        [ -e /dev/kvm ] || die "/dev/kvm is missing: no KVM here (load kvm_intel/kvm_amd, enable nested virtualization, or BAVM_ACCEL=tcg)"
        [ -r /dev/kvm ] && [ -w /dev/kvm ] || die "/dev/kvm is not readable and writable by $(id -un) (join group kvm, or run as root)"
        accel_args=(-accel kvm -cpu host) ;;
    tcg) accel_args=(-accel tcg,thread=multi,tb-size=512 -cpu max) ;;
    *) die "BAVM_ACCEL must be auto, kvm or tcg, not $accel" ;;
esac
command -v qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 is missing: apt-get install --no-install-recommends qemu-system-x86"
command -v timeout >/dev/null || die "timeout is missing: apt-get install coreutils"
[ -f "$init_script" ] || die "$init_script is missing"
if [ $# -eq 0 ]; then
    [ -x "$repo/.venv/bin/python" ] || die "$repo/.venv/bin/python is missing: run make setup, or name the python: $0 PYTHON $repo/scripts/pure_v2_probe.py"
    set -- "$repo/.venv/bin/python" "$repo/scripts/pure_v2_probe.py"
fi

mkdir -p "$cache"

# --- debs: kernel and busybox-static, fetched once -----------------------
fetch() {  # fetch PACKAGE DIR: the deb unpacked into $cache/DIR
    local pkg=$1 dir=$cache/$2 deb
    [ -f "$dir/.done" ] && return 0
    command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null \
        || die "apt-get and dpkg-deb are needed to fetch $pkg (a Debian or Ubuntu host)"
    deb=$(ls "$cache"/"${pkg}"_*.deb 2>/dev/null | head -n1 || true)
    if [ -z "$deb" ]; then
        note "fetching $pkg"
        (cd "$cache" && apt-get download -q "$pkg" 2>&1 | grep -v 'unsandboxed' >&2) \
            || die "apt-get download $pkg failed (apt-get update first?)"
        deb=$(ls "$cache"/"${pkg}"_*.deb | head -n1)
    fi
    rm -rf "$dir"
    dpkg-deb -x "$deb" "$dir"
    touch "$dir/.done"
}

kpkg=""
[ -f "$cache/kernel/.done" ] && [ -f "$cache/kernel.pkg" ] && kpkg=$(cat "$cache/kernel.pkg")
if [ -z "$kpkg" ]; then
    command -v apt-cache >/dev/null || die "apt-cache is needed to find the kernel package"
    kpkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
    [ -n "$kpkg" ] || die "no kernel package behind linux-image-amd64 (apt-get update first?)"
fi
fetch "$kpkg" kernel
echo "$kpkg" > "$cache/kernel.pkg"
fetch busybox-static busybox

vmlinuz=$(ls "$cache"/kernel/boot/vmlinuz-* | head -n1)
kver=${vmlinuz##*/vmlinuz-}
kmods=$cache/kernel/lib/modules/$kver
busybox=$cache/busybox/bin/busybox
[ -x "$busybox" ] || die "no bin/busybox in the busybox-static package"

# --- initramfs: rebuilt when the init, the kernel or the module list change
mod_path() { find "$kmods/kernel" -name "$1.ko" | head -n1; }
mod_deps() { tr '\0' '\n' < "$1" | sed -n 's/^depends=//p' | tr ',' ' '; }
declare -A seen=()
order=()
add_mod() {  # add_mod NAME: its dependencies first
    local name=${1//-/_} path dep
    [ -n "${seen[$name]:-}" ] && return 0
    seen[$name]=1
    path=$(mod_path "$name")
    [ -n "$path" ] || { grep -q "/$name.ko\$" "$kmods/modules.builtin" 2>/dev/null && return 0; \
        die "module $name not found in $kver"; }
    for dep in $(mod_deps "$path"); do add_mod "$dep"; done
    order+=("$name")
}
for m in "${want_modules[@]}"; do add_mod "$m"; done

key=$( { sha256sum "$init_script" "$busybox"; echo "$kver ${order[*]}"; } | sha256sum | cut -c1-16)
initrd=$cache/initramfs-$key.cpio.gz
if [ ! -f "$initrd" ]; then
    note "building the initramfs ($kver: ${order[*]})"
    stage=$(mktemp -d "$cache/stage.XXXXXX")
    mkdir -p "$stage/bin" "$stage/modules"
    cp "$busybox" "$stage/bin/busybox"
    install -m 755 "$init_script" "$stage/init"
    for m in "${order[@]}"; do cp "$(mod_path "$m")" "$stage/modules/$m.ko"; done
    printf '%s\n' "${order[@]}" > "$stage/modules.order"
    (cd "$stage" && find . -mindepth 1 | "$busybox" cpio -o -H newc 2>/dev/null) | gzip -1 > "$initrd.tmp"
    mv "$initrd.tmp" "$initrd"
    rm -rf "$stage"
    find "$cache" -maxdepth 1 -name 'initramfs-*.cpio.gz' ! -name "${initrd##*/}" -delete
fi

# --- the job: read by the guest from the 9p share before it covers /tmp ---
job=$(mktemp -d "${TMPDIR:-/tmp}/branchagent-vm.XXXXXX")
trap 'rm -rf "$job"' EXIT
chmod 755 "$job"
q() { local s=${1//\'/\'\\\'\'}; printf "'%s'" "$s"; }
marker="BAVM_EXIT_$(od -An -N6 -tx1 /dev/urandom | tr -d ' \n')"
{
    echo "cd $(q "$PWD") || exit 126"
    for a in "$@"; do printf '%s ' "$(q "$a")"; done
    echo
} > "$job/job.sh"
echo "$marker" > "$job/marker"
chmod 644 "$job/job.sh" "$job/marker"

quiet="quiet loglevel=3"
[ "${BAVM_VERBOSE:-0}" = 1 ] && quiet=""
append="console=ttyS0 panic=-1 $quiet cgroup_no_v1=all systemd.unified_cgroup_hierarchy=1 bavm.job=$job"

note "booting $kver (${accel^^}, $smp CPUs, $mem) to run: $*"
start=$EPOCHREALTIME
set +e
timeout --foreground -k 10 "$vm_timeout" qemu-system-x86_64 \
    "${accel_args[@]}" -m "$mem" -smp "$smp" \
    -nodefaults -no-user-config -no-reboot -display none -monitor none -serial stdio \
    -kernel "$vmlinuz" -initrd "$initrd" -append "$append" \
    -virtfs local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap \
    </dev/null 2>&1 | sed -u 's/\r//g' | tee "$job/console.log"
qrc=${PIPESTATUS[0]}
set -e
elapsed=$(awk -v a="$start" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }')
rc=$(sed -n "s/^$marker=\([0-9][0-9]*\)\$/\1/p" "$job/console.log" | tail -n1)
if [ "$qrc" = 124 ] || [ "$qrc" = 137 ]; then
    note "the VM ran past ${vm_timeout}s (BAVM_TIMEOUT): killed"
    exit 124
fi
[ -n "$rc" ] || die "the VM ended (qemu status $qrc) without printing the command's exit status"
note "command exited $rc; VM run ${elapsed}s in all"
exit "$rc"
