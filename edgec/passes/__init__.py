"""The pass registry: recipe names to Pass classes."""

from edgec.passes.export import ExportPass
from edgec.passes.fuse import FusePass
from edgec.passes.quantize import QuantizePass

PASSES = {
    "fuse": FusePass,
    "export": ExportPass,
    "quantize": QuantizePass,
}
