"""A board on its own network host (a network namespace behind a veth pair), and the hook for
real or emulated boards (``board`` marker, run by hand)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from edgec.devices.inventory import parse_device
from edgec.devices.ssh import SSHDevice
from edgec.measure import MeasureSpec
from tests import sshd

QUICK = sshd.QUICK
board = sshd.board_config


@pytest.fixture
def netns_board(tmp_path):
    """sshd inside a fresh network namespace at 10.77.N.2; always torn down."""
    for reason in (sshd.missing_reason(), sshd.Namespace.missing_reason()):
        if reason:
            pytest.skip(reason)
    namespace = sshd.Namespace()
    server = None
    try:
        namespace.create()
        server = sshd.SSHServer(tmp_path / "sshd", host=namespace.board_ip,
                                netns=namespace.name).start()
        yield server
    finally:
        if server is not None:
            server.stop()
        namespace.delete()


def test_profile_a_board_in_its_own_network_namespace(netns_board, digits_int8_artifact,
                                                      tmp_path):
    assert netns_board.host.startswith("10.77.")  # only our own namespace is ever targeted
    with SSHDevice(board(netns_board, tmp_path / "board", name="netns-board")) as device:
        first = device.measure(digits_int8_artifact, QUICK)
        second = device.measure(digits_int8_artifact, QUICK)
    assert device.uploads == 1
    assert len(first.samples_ms) >= 30 and len(second.samples_ms) >= 30


@pytest.mark.board
def test_board_from_the_environment_profiles_its_artifact():
    """Hook for a real board or the emulated aarch64 one (arm64 root under qemu, sshd in a
    namespace): set EDGEC_TEST_BOARD to its devices/*.toml and EDGEC_TEST_BOARD_ARTIFACT to an
    artifact built for its target (e.g. `edgec build ... --target rpi4`)."""
    device_file = os.environ.get("EDGEC_TEST_BOARD")
    artifact = os.environ.get("EDGEC_TEST_BOARD_ARTIFACT")
    if not device_file or not artifact:
        pytest.skip("set EDGEC_TEST_BOARD (device TOML) and EDGEC_TEST_BOARD_ARTIFACT "
                    "(artifact directory) to profile a real or emulated board")
    config = parse_device(Path(device_file))
    with SSHDevice(config) as device:
        facts = device.facts()
        measurement = device.measure(Path(artifact), MeasureSpec(warmup=2, repeat=10,
                                                                 min_time_s=0.0))
    print(f"\n{config.name}: {facts.get('arch')} {facts.get('os')}, p50 "
          f"{measurement.p50:.3f} ms, warnings {list(measurement.warnings)}")
    assert measurement.p50 > 0
