"""The pass registry: recipe names to Pass classes."""

from edgec.passes.early_exit import EarlyExitPass
from edgec.passes.export import ExportPass
from edgec.passes.fuse import FusePass
from edgec.passes.hls_rewrite import HlsRewritePass
from edgec.passes.prune import PrunePass
from edgec.passes.quantize import QuantizePass
from edgec.passes.quantize_pt2e import QuantizePt2ePass

PASSES = {
    "fuse": FusePass,
    "prune": PrunePass,
    "export": ExportPass,
    "quantize": QuantizePass,
    "early_exit": EarlyExitPass,
    "quantize_pt2e": QuantizePt2ePass,
    "hls_rewrite": HlsRewritePass,
}
