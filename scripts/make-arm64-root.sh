#!/usr/bin/env bash
# An emulated Raspberry Pi: an arm64 Debian root run under qemu-user, with the board-side Python
# runtimes (numpy, onnxruntime, apache-tvm) that edgec's aarch64 artifacts need.
#
# Idempotent and cached: the root lives in .board/arm64-root (gitignored); a second run only
# re-registers qemu with binfmt_misc (lost at reboot), makes sure the board's OpenSSH server is
# there, and returns. Needs root and the Debian
# packages qemu-user-static, debootstrap and binfmt-support. About 5-8 minutes the first time.
# Usage: scripts/make-arm64-root.sh [ROOT]    (default: .board/arm64-root)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(realpath -m "${1:-.board/arm64-root}")
STAMP="$ROOT/.edgec-ready-v1"
# The board's Python packages: the versions edgec was measured with on the host.
PYTHON=${PYTHON:-$(command -v python || command -v python3)}  # any pip: it only unpacks wheels
WHEELS=(numpy==2.4.* onnxruntime==1.31.1 apache-tvm==0.27.0.post1 apache-tvm-ffi==0.1.14.post1)

register_qemu() {
    local misc=/proc/sys/fs/binfmt_misc
    [ -e "$misc/register" ] || mount -t binfmt_misc binfmt_misc "$misc"
    [ -e "$misc/qemu-aarch64" ] || cat /usr/lib/binfmt.d/qemu-aarch64.conf > "$misc/register"
}

make_root() {
    local partial="$ROOT.partial"
    rm -rf "$partial"
    mkdir -p "$(dirname "$ROOT")"
    debootstrap --arch=arm64 --foreign --variant=minbase --include=python3 \
        bookworm "$partial" http://deb.debian.org/debian
    chroot "$partial" /debootstrap/debootstrap --second-stage
    mv "$partial" "$ROOT"
}

# aarch64 wheels are unpacked by the host's pip (no emulation needed: they are only files) into
# /opt/edgec-site, which the root's python3 reads through a .pth file.
install_wheels() {
    local site="$ROOT/opt/edgec-site"
    rm -rf "$site"
    "$PYTHON" -m pip install -q --no-cache-dir --target "$site" --only-binary=:all: \
        --implementation cp --python-version 3.11 \
        --platform manylinux_2_28_aarch64 --platform manylinux_2_27_aarch64 \
        --platform manylinux_2_17_aarch64 --platform manylinux2014_aarch64 \
        "${WHEELS[@]}"
    echo /opt/edgec-site > "$ROOT/usr/lib/python3/dist-packages/edgec-site.pth"
}

# The board's own sshd (aarch64, under qemu), so the root can be an SSH target: installed with
# apt inside the root; /proc only (with /sys, qemu'd programs may read the host's x86 topology),
# and a policy-rc.d so that no service is started in the chroot.
install_sshd() {
    [ -x "$ROOT/usr/sbin/sshd" ] && return 0
    [ -s "$ROOT/etc/resolv.conf" ] || cp /etc/resolv.conf "$ROOT/etc/resolv.conf"
    printf '#!/bin/sh\nexit 101\n' > "$ROOT/usr/sbin/policy-rc.d"
    chmod +x "$ROOT/usr/sbin/policy-rc.d"
    unshare -m sh -c 'mount -t proc proc "$0/proc" && exec chroot "$0" sh -c \
        "apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
         --no-install-recommends openssh-server && apt-get clean"' "$ROOT"
    rm -f "$ROOT/usr/sbin/policy-rc.d"
    mkdir -p "$ROOT/run/sshd"
}

register_qemu
if [ -f "$STAMP" ]; then
    # roots made before the board had sshd get it now; without apt access they stay usable
    install_sshd || echo "warning: could not install openssh-server in $ROOT" >&2
    echo "arm64 root ready: $ROOT"
    exit 0
fi
[ -x "$ROOT/usr/bin/python3" ] || make_root
install_sshd
install_wheels
chroot "$ROOT" /usr/bin/python3 -c "import numpy, onnxruntime, tvm.runtime; print('arm64 root ok')"
touch "$STAMP"
echo "arm64 root ready: $ROOT"
