"""Devices run artifacts: LocalDevice here, SSHDevice on a board."""

from edgec.devices.base import Device
from edgec.devices.local import LocalDevice

__all__ = ["Device", "LocalDevice", "open_device"]


def open_device(name: str = "local", devices_dir=None, accept_new_host_key: bool = False):
    """``local`` → LocalDevice; any other name → SSHDevice from ``devices/<name>.toml``."""
    if name == "local":
        return LocalDevice()
    from edgec.devices.inventory import load_device
    from edgec.devices.ssh import SSHDevice

    return SSHDevice(load_device(name, devices_dir), accept_new_host_key=accept_new_host_key)
