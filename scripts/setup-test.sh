#!/usr/bin/env bash
# Everything the test suite needs on a fresh Debian machine: system packages, then Python ones.
set -euo pipefail
cd "$(dirname "$0")/.."
# System packages (root on Debian only; elsewhere the tests that need them skip with a reason).
apt_install() {
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        [ -n "${EDGEC_APT_UPDATED:-}" ] || { apt-get update -qq; EDGEC_APT_UPDATED=1; }
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
    fi
}
apt_install openssh-server openssh-client iproute2   # SSH device tests: real sshd, netns board
apt_install g++   # hls4ml's C simulation (tests/test_hls.py)
apt_install postgresql   # tests/test_workers.py: a throwaway cluster (initdb, pg_ctl) per session
# TVM cross-compilation for aarch64 and the emulated Raspberry Pi (qemu-user + arm64 Debian root)
apt_install gcc-aarch64-linux-gnu g++-aarch64-linux-gnu qemu-user-static qemu-user debootstrap \
    binfmt-support
python -m pip install -q torch==2.13.0   # the local CPU wheel; never a CUDA build
python -m pip install -q -e ".[test,postgres]"   # postgres: the drivers of postgresql:// URLs
python -m pip install -q -e ".[tvm]"
python -m pip install -q -e ".[mobile,fpga]" torch==2.13.0   # ExecuTorch, hls4ml; keep torch
# the emulated Raspberry Pi for tests/test_rpi4_qemu.py (cached in .board/; ~5-8 min the first time)
if [ "$(id -u)" = 0 ] && command -v debootstrap >/dev/null; then
    bash scripts/make-arm64-root.sh || echo "warning: no emulated board; its tests will skip" >&2
fi
