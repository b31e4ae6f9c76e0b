"""The "compilation" step of a packaging job: target resolution, compiler options, ONNX Runtime
offline optimisation for CPU targets, and the record of what was (and was not) applied.

Lookout for Vision compiled models with SageMaker Neo (TVM/TensorRT). This agent runs ONNX with
ONNX Runtime, so the honest equivalent is:

* CPU targets: ORT's hardware-independent graph optimisations (constant folding, node fusions:
  level "extended") applied offline, the result checked against the original model on the same
  input. Layout optimisations (NCHWc blocking) depend on the CPU that runs them, so they are left
  to the device (the manifest asks the runtime for level "all"). ``mcpu``/``mattr`` cannot be
  forced on ORT: its MLAS kernels pick AVX2/AVX-512/NEON by CPUID on the device. They are
  validated against the target architecture and recorded, with a note saying so.
* NVIDIA targets: no offline rewrite (CPU-only fused ops would keep nodes away from TensorRT);
  ``gpu-code``, ``trt-ver``, ``cuda-ver`` and fp16 go into the manifest's ``execution`` object,
  from which the agent configures its TensorRT/CUDA execution providers.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agent.core.package import ModelPackage
from agent.packaging.errors import ValidationException

# LFV TargetPlatform.Arch → Greengrass platform architecture (nucleus PlatformResolver names).
GG_ARCH = {"ARM64": "aarch64", "X86_64": "amd64"}
TARGET_DEVICES = {"jetson_xavier"}
# What Lookout for Vision documented for a Jetson AGX Xavier (JetPack 4.6: TensorRT 8.2.1, CUDA 10.2).
JETSON_XAVIER_OPTIONS = {"gpu-code": "sm_72", "trt-ver": "8.2.1", "cuda-ver": "10.2"}
DEFAULT_X86_MCPU = "core-avx2"  # LFV's documented default for CPU targets

NVIDIA_KEYS = ("gpu-code", "trt-ver", "cuda-ver")
NVIDIA_OPTIONAL = ("fp16",)  # extension: TensorRT fp16 (default true)
CPU_KEYS = ("mcpu", "mattr")
GPU_CODE_RE = re.compile(r"^sm_[0-9]{2,3}[a-z]?$")
TRT_VER_RE = re.compile(r"^[0-9]+\.[0-9]+\.[0-9]+$")
CUDA_VER_RE = re.compile(r"^[0-9]+\.[0-9]+$")
MCPU_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")
MATTR_RE = re.compile(r"^[+-][A-Za-z0-9._-]{1,63}$")

# LLVM CPU names whose architecture we know, to refuse an x86 mcpu for an ARM64 target and back.
X86_CPUS = {
    "x86-64", "x86-64-v2", "x86-64-v3", "x86-64-v4", "core-avx2", "core-avx-i", "corei7", "corei7-avx",
    "nehalem", "westmere", "sandybridge", "ivybridge", "haswell", "broadwell", "skylake", "skylake-avx512",
    "cascadelake", "cooperlake", "cannonlake", "icelake-client", "icelake-server", "tigerlake", "alderlake",
    "sapphirerapids", "emeraldrapids", "graniterapids", "znver1", "znver2", "znver3", "znver4", "znver5",
}
ARM64_CPUS = {
    "generic", "cortex-a53", "cortex-a55", "cortex-a57", "cortex-a72", "cortex-a73", "cortex-a75", "cortex-a76",
    "cortex-a77", "cortex-a78", "cortex-x1", "carmel", "neoverse-n1", "neoverse-n2", "neoverse-v1", "neoverse-v2",
    "apple-m1", "thunderx2t99", "a64fx", "armv8-a", "armv8.2-a",
}
X86_ATTRS = {"avx", "avx2", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512vnni", "avxvnni", "fma", "sse4.1",
             "sse4.2", "ssse3", "f16c", "bmi", "bmi2", "amx-int8", "amx-bf16"}
ARM_ATTRS = {"neon", "vfpv4", "fp-armv8", "crypto", "crc", "dotprod", "fullfp16", "fp16fml", "sve", "sve2", "i8mm",
             "bf16", "lse", "rdm"}


@dataclass(frozen=True)
class Target:
    """Where the component runs: Greengrass platform plus accelerator."""

    os: str  # Greengrass platform os: "linux"
    architecture: str  # Greengrass platform architecture: "aarch64" | "amd64"
    accelerator: str  # "NVIDIA" | "CPU"
    device: str = ""  # "jetson_xavier" when chosen by TargetDevice
    options: Mapping[str, Any] = field(default_factory=dict)  # the parsed CompilerOptions (with defaults)

    @property
    def nvidia(self) -> bool:
        return self.accelerator == "NVIDIA"


def _options_json(text: Any) -> dict[str, Any]:
    if not isinstance(text, str):
        raise ValidationException("Configuration.Greengrass.CompilerOptions must be a string holding a JSON object")
    if not 3 <= len(text) <= 1024:
        raise ValidationException("Configuration.Greengrass.CompilerOptions must be 3 to 1024 characters long")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValidationException(f"Configuration.Greengrass.CompilerOptions is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ValidationException("Configuration.Greengrass.CompilerOptions must be a JSON object, e.g. "
                                  '{"gpu-code": "sm_75", "trt-ver": "7.1.3", "cuda-ver": "10.2"}')
    return value


def _nvidia_options(options: dict[str, Any]) -> dict[str, Any]:
    where = "Configuration.Greengrass.CompilerOptions"
    unknown = sorted(set(options) - set(NVIDIA_KEYS) - set(NVIDIA_OPTIONAL))
    if unknown:
        raise ValidationException(f"{where}: {unknown} are not options for an NVIDIA accelerator; use "
                                  f"{list(NVIDIA_KEYS)} (and optionally 'fp16')")
    missing = [k for k in NVIDIA_KEYS if k not in options]
    if missing:
        raise ValidationException(f"{where}: an NVIDIA accelerator needs {list(NVIDIA_KEYS)}; missing {missing}")
    checks = (("gpu-code", GPU_CODE_RE, "sm_XY, e.g. sm_72"), ("trt-ver", TRT_VER_RE, "x.y.z, e.g. 8.2.1"),
              ("cuda-ver", CUDA_VER_RE, "x.y, e.g. 10.2"))
    for key, pattern, shape in checks:
        if not isinstance(options[key], str) or not pattern.match(options[key]):
            raise ValidationException(f"{where}: {key} {options[key]!r} must look like {shape}")
    fp16 = options.get("fp16", True)
    if not isinstance(fp16, bool):
        raise ValidationException(f"{where}: fp16 must be true or false")
    return {**{k: options[k] for k in NVIDIA_KEYS}, "fp16": fp16}


def _cpu_options(options: dict[str, Any], arch: str) -> dict[str, Any]:
    where = "Configuration.Greengrass.CompilerOptions"
    unknown = sorted(set(options) - set(CPU_KEYS))
    if unknown:
        raise ValidationException(f"{where}: {unknown} are not options for a CPU target; use {list(CPU_KEYS)} "
                                  "(or set TargetPlatform.Accelerator to NVIDIA for gpu-code/trt-ver/cuda-ver)")
    result: dict[str, Any] = {}
    mcpu = options.get("mcpu", DEFAULT_X86_MCPU if arch == "amd64" else None)
    if mcpu is not None:
        if not isinstance(mcpu, str) or not MCPU_RE.match(mcpu):
            raise ValidationException(f"{where}: mcpu {mcpu!r} must be a CPU name such as 'skylake-avx512'")
        if arch == "aarch64" and mcpu in X86_CPUS or arch == "amd64" and mcpu in ARM64_CPUS:
            raise ValidationException(f"{where}: mcpu {mcpu!r} is not a CPU of the target architecture {arch}")
        result["mcpu"] = mcpu
    mattr = options.get("mattr")
    if mattr is not None:
        if not (isinstance(mattr, list) and all(isinstance(a, str) and MATTR_RE.match(a) for a in mattr)):
            raise ValidationException(f"{where}: mattr must be a list of CPU flags like ['+neon', '+vfpv4']")
        foreign = ARM_ATTRS if arch == "amd64" else X86_ATTRS
        wrong = [a for a in mattr if a[1:] in foreign]
        if wrong:
            raise ValidationException(f"{where}: mattr {wrong} are not flags of the target architecture {arch}")
        result["mattr"] = list(mattr)
    return result


def resolve_target(greengrass: Mapping[str, Any]) -> Target:
    """Validate TargetDevice / TargetPlatform / CompilerOptions of a Greengrass configuration.

    Raises ValidationException for every rule of the StartModelPackagingJob page: exactly one of
    TargetDevice and TargetPlatform, no CompilerOptions with TargetDevice, NVIDIA needs gpu-code,
    trt-ver and cuda-ver.
    """
    where = "Configuration.Greengrass"
    device = greengrass.get("TargetDevice")
    platform = greengrass.get("TargetPlatform")
    options_text = greengrass.get("CompilerOptions")
    if device is not None and platform is not None:
        raise ValidationException(f"{where}: specify TargetDevice or TargetPlatform, not both")
    if device is None and platform is None:
        raise ValidationException(f"{where}: specify a TargetDevice (jetson_xavier) or a TargetPlatform")
    if device is not None:
        if device not in TARGET_DEVICES:
            raise ValidationException(f"{where}.TargetDevice {device!r} is not supported; the only value is "
                                      "'jetson_xavier'")
        if options_text is not None:
            raise ValidationException(f"{where}: CompilerOptions can't be specified with TargetDevice (the "
                                      "device implies them)")
        return Target("linux", "aarch64", "NVIDIA", device, {**JETSON_XAVIER_OPTIONS, "fp16": True})
    if not isinstance(platform, Mapping):
        raise ValidationException(f"{where}.TargetPlatform must be an object with Os and Arch")
    extra = sorted(set(platform) - {"Os", "Arch", "Accelerator"})
    if extra:
        raise ValidationException(f"{where}.TargetPlatform has unknown keys {extra}")
    if platform.get("Os") != "LINUX":
        raise ValidationException(f"{where}.TargetPlatform.Os must be LINUX, got {platform.get('Os')!r}")
    arch_name = platform.get("Arch")
    if arch_name not in GG_ARCH:
        raise ValidationException(f"{where}.TargetPlatform.Arch must be ARM64 or X86_64, got {arch_name!r}")
    arch = GG_ARCH[arch_name]
    accelerator = platform.get("Accelerator")
    if accelerator not in (None, "NVIDIA"):
        raise ValidationException(f"{where}.TargetPlatform.Accelerator must be NVIDIA or absent (CPU), got "
                                  f"{accelerator!r}")
    options = _options_json(options_text) if options_text is not None else {}
    if accelerator == "NVIDIA":
        if options_text is None:
            raise ValidationException(f"{where}: an NVIDIA accelerator needs CompilerOptions with gpu-code, trt-ver "
                                      "and cuda-ver")
        return Target("linux", arch, "NVIDIA", "", _nvidia_options(options))
    return Target("linux", arch, "CPU", "", _cpu_options(options, arch))


# ---------------------------------------------------------------------------------------------
# The compilation itself


@dataclass(frozen=True)
class CompileResult:
    model_file: Path  # the ONNX file to package (in the work directory)
    files: list[str]  # every file of the model, relative to model_file's directory
    execution: dict[str, Any]  # the manifest's "execution" object
    record: dict[str, Any]  # the manifest's "compilation" object


def _ort_version() -> str:
    import onnxruntime as ort

    return str(ort.__version__)


def _feed(session: Any, package: ModelPackage) -> dict[str, np.ndarray]:
    """A deterministic input for the model: the package's image size, values in the model's 0..1 range."""
    rng = np.random.default_rng(1234)
    feeds = {}
    for inp in session.get_inputs():
        shape = [d if isinstance(d, int) and d > 0 else 1 for d in inp.shape]
        if len(shape) == 4:
            shape[2], shape[3] = package.image_height, package.image_width
        feeds[inp.name] = rng.random(shape, dtype=np.float32)
    return feeds


def _session(path: Path, level: str = "ORT_DISABLE_ALL", save_to: Path | None = None) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    so.log_severity_level = 3
    if save_to is not None:
        so.optimized_model_filepath = str(save_to)
        # Keep weights in an external file, as the input had them: a >2 GiB protobuf can't be written.
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                    save_to.name + ".data")
        so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])


def _compare(reference: list[np.ndarray], candidate: list[np.ndarray], names: list[str]) -> float:
    """Largest absolute difference of float outputs; raises if any output disagrees."""
    worst = 0.0
    if not len(names) == len(reference) == len(candidate):
        raise RuntimeError(f"outputs {names} gave {len(reference)} reference and {len(candidate)} candidate values")
    for name, a, b in zip(names, reference, candidate):
        if a.shape != b.shape:
            raise RuntimeError(f"output {name!r} changed shape from {a.shape} to {b.shape}")
        if np.issubdtype(a.dtype, np.floating):
            diff = float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))) if a.size else 0.0
            if not np.allclose(a, b, rtol=1e-3, atol=1e-4):
                raise RuntimeError(f"output {name!r} differs by up to {diff:.3g} after optimisation")
            worst = max(worst, diff)
        else:
            # Thresholded outputs (masks) may flip for values sitting exactly on the threshold.
            mismatch = float(np.mean(a != b)) if a.size else 0.0
            if mismatch > 1e-3:
                raise RuntimeError(f"output {name!r} differs in {mismatch:.2%} of its values after optimisation")
    return worst


def compile_model(package: ModelPackage, target: Target, work: Path) -> CompileResult:
    """Produce the model files for target in work/ (created) and say what was done.

    Raises RuntimeError (the job's FAILED message) if the model does not run in ONNX Runtime or
    the optimised graph disagrees with the original.
    """
    work.mkdir(parents=True, exist_ok=True)
    src = package.model_file
    try:
        original = _session(src)
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
        raise RuntimeError(f"the model does not load in ONNX Runtime: {str(exc).splitlines()[0]}") from exc
    feeds = _feed(original, package)
    names = [o.name for o in original.get_outputs()]
    try:
        reference = original.run(names, feeds)
    except Exception as exc:
        raise RuntimeError(f"the model fails to run on a {package.image_width}x{package.image_height} input: "
                           f"{str(exc).splitlines()[0]}") from exc
    del original
    record: dict[str, Any] = {
        "compiler": f"onnxruntime {_ort_version()}",
        "target": {"os": target.os, "architecture": target.architecture, "accelerator": target.accelerator,
                   **({"device": target.device} if target.device else {})},
        "compiler_options": dict(target.options),
    }
    if target.nvidia:
        for rel in _model_files(package):
            dest = work / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(package.root / rel, dest)
        record["graph_optimization"] = {"offline": "none", "on_device": "all"}
        record["notes"] = [
            "NVIDIA target: the ONNX graph is packaged unchanged; TensorRT builds its engine on the device "
            "(cached in the agent's work directory) from the recorded gpu-code/trt-ver/cuda-ver/fp16 settings",
        ]
        execution = {
            "providers": ["tensorrt", "cuda", "cpu"],
            "trt_fp16": bool(target.options.get("fp16", True)),
            "gpu_code": target.options["gpu-code"],
            "trt_ver": target.options["trt-ver"],
            "cuda_ver": target.options["cuda-ver"],
            "graph_optimization": "all",
        }
        return CompileResult(work / src.name, _model_files(package), execution, record)

    out = work / src.name
    try:
        _session(src, "ORT_ENABLE_EXTENDED", save_to=out)
        optimised = _session(out)
        candidate = optimised.run(names, feeds)
    except Exception as exc:
        raise RuntimeError(f"ONNX Runtime offline optimisation failed: {str(exc).splitlines()[0]}") from exc
    del optimised
    worst = _compare(reference, candidate, names)
    files = [out.name] + ([out.name + ".data"] if (work / (out.name + ".data")).exists() else [])
    notes = ["graph optimisations of level 'extended' (constant folding, node fusions) applied offline; layout "
             "optimisations depend on the device CPU and are applied there (graph_optimization 'all')"]
    not_applied = {}
    if "mcpu" in target.options:
        not_applied["mcpu"] = ("ONNX Runtime has no ahead-of-time code generation for a CPU model: its "
                               "kernels pick AVX2/AVX-512/NEON code paths by CPUID on the device at run time")
    if "mattr" in target.options:
        not_applied["mattr"] = ("CPU flags are detected on the device at run time; they cannot be forced into an "
                                "ONNX graph")
    record.update({
        "graph_optimization": {"offline": "extended", "on_device": "all"},
        "verified": {"outputs": names, "max_abs_diff": worst},
        "notes": notes,
        "not_applied": not_applied,
    })
    execution = {"providers": ["cpu"], "graph_optimization": "all"}
    return CompileResult(out, files, execution, record)


def _model_files(package: ModelPackage) -> list[str]:
    """The ONNX file and its external data files, relative to the package root."""
    from agent.core.package import inspect_onnx

    return [package.model_file.name, *inspect_onnx(package.model_file).external_files]
