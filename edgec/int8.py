"""int8 schemes and the backends' policies for choosing one per CPU (the pt2e pattern: the backend
states the policy, the ``quantize`` pass is the mechanism).

ONNX Runtime's CPU kernels (MLAS) multiply u8 activations by s8 weights. With an int8 dot
product (x86 VNNI / AMX, Arm SDOT / UDOT / i8mm) or Arm's widening multiplies the sums are exact;
on x86 without VNNI, VPMADDUBSW adds pairs of u8 x s8 products into int16, which saturates, and
ONNX Runtime's documentation recommends 7-bit weights (``reduce_range``) there. Measured on an
AVX2-only x86 (ResNet-20, full CIFAR-10 test set): u8s8 91.22 %, u8s8 with reduce_range 91.61 %
at the same speed, u8u8 91.76 % at 1.5x the time, s8s8 91.79 % at 2.2x; fp32 91.73 %.
TensorRT takes only symmetric signed int8 (zero point 0) in explicit-quantization graphs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from edgec.cpu import CpuInfo
from edgec.errors import ConfigError
from edgec.runner.runner import u8s8_saturates

INT8_TYPES = ("u8", "s8")


@dataclass(frozen=True)
class Int8Scheme:
    """How int8 tensors are typed: activation and weight types, 7-bit weights, symmetry."""

    activations: str
    weights: str
    reduce_range: bool = False
    symmetric_activations: bool = False

    def __post_init__(self):
        for name in ("activations", "weights"):
            if getattr(self, name) not in INT8_TYPES:
                raise ValueError(f"{name} {getattr(self, name)!r}: choose one of {INT8_TYPES}")

    @property
    def name(self) -> str:
        suffix = "-reduce-range" if self.reduce_range else ""
        suffix += "-symmetric" if self.symmetric_activations else ""
        return f"{self.activations}{self.weights}{suffix}"

    def ort_options(self) -> dict[str, Any]:
        """Keyword arguments for onnxruntime.quantization.quantize_static."""
        from onnxruntime.quantization import QuantType

        types = {"u8": QuantType.QUInt8, "s8": QuantType.QInt8}
        extra = {"ActivationSymmetric": True} if self.symmetric_activations else {}
        return {"activation_type": types[self.activations], "weight_type": types[self.weights],
                "reduce_range": self.reduce_range, "extra_options": extra}


U8S8 = Int8Scheme("u8", "s8")
U8S8_REDUCE_RANGE = Int8Scheme("u8", "s8", reduce_range=True)
U8U8 = Int8Scheme("u8", "u8")
S8S8 = Int8Scheme("s8", "s8")
S8S8_SYMMETRIC = Int8Scheme("s8", "s8", symmetric_activations=True)
SCHEMES = {s.name: s for s in (U8S8, U8S8_REDUCE_RANGE, U8U8, S8S8, S8S8_SYMMETRIC)}


@dataclass(frozen=True)
class Int8Choice:
    """The scheme for one build, why, and the CPU it was chosen for."""

    scheme: Int8Scheme
    reason: str
    cpu: CpuInfo

    def to_json(self) -> dict[str, Any]:
        """Scheme, reason and int8 path only: the same on every CPU of one kernel family."""
        return {"scheme": self.scheme.name, "reason": self.reason,
                "int8_path": self.cpu.int8_path}


def saturates(scheme: Int8Scheme, int8_path: str) -> bool:
    """Whether ``scheme``'s int16 pair sums can saturate on CPUs of ``int8_path``."""
    return u8s8_saturates(scheme.name, int8_path)


def onnxruntime_policy(cpu: CpuInfo) -> Int8Choice:
    """ONNX Runtime (MLAS): u8s8, with 7-bit weights where u8s8 would saturate."""
    if saturates(U8S8, cpu.int8_path):
        return Int8Choice(U8S8_REDUCE_RANGE, f"{cpu.int8_path} has no int8 dot product: u8 x s8 "
                          f"pair sums saturate in int16, so weights use 7 bits (same speed)", cpu)
    return Int8Choice(U8S8, f"{cpu.int8_path} sums u8 x s8 products exactly", cpu)


def tensorrt_policy(cpu: CpuInfo) -> Int8Choice:
    """TensorRT: symmetric signed int8 only, whatever the host CPU."""
    return Int8Choice(S8S8_SYMMETRIC, "TensorRT explicit quantization takes symmetric s8 only", cpu)


# backend name -> the policy of the kernels that run its int8 graphs
POLICIES = {
    "onnxruntime": onnxruntime_policy,
    "cascade": onnxruntime_policy,
    "ort-mobile": onnxruntime_policy,
    "tensorrt": tensorrt_policy,
}


def choose(target, cpu: CpuInfo, backend: str | None = None, forced: str = "auto") -> Int8Choice:
    """The scheme for ``target``: ``forced`` by name, else the policy of ``backend`` (default: the
    first of the target's backends that has one) for ``cpu``."""
    if forced != "auto":
        return Int8Choice(SCHEMES[forced], "set in the recipe (scheme)", cpu)
    names = [backend] if backend else list(target.backends)
    policy = next((POLICIES[name] for name in names if name in POLICIES), None)
    if policy is None:
        raise ConfigError(f"no int8 policy for backend(s) {names} of target {target.name!r}; "
                          f"set the quantize step's scheme to one of {sorted(SCHEMES)} or use a "
                          f"backend with one: {sorted(POLICIES)}")
    return policy(cpu)
