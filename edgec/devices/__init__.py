"""Devices run artifacts: LocalDevice here, SSHDevice on a board."""

from edgec.devices.base import Device
from edgec.devices.local import LocalDevice

__all__ = ["Device", "LocalDevice"]
