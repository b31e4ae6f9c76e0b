"""ONNX Runtime sessions, with execution providers chosen from config + package, and no silent fallback.

onnxruntime-gpu quietly runs on the CPU when CUDA/TensorRT libraries are missing
(microsoft/onnxruntime#17801, #23372). After creating a session we compare the providers it really
uses with those requested, say so in the model's status message, and with RequireAccelerator fail
the load instead.

onnxruntime-gpu also lists CUDA and TensorRT as "available" on a machine without them, and asking for
them then prints red "Failed to load library libcublas..." / "EP Error" lines on every load. So once
per runtime the GPU providers' own libraries (and the CUDA driver) are loaded with ctypes, exactly as
ONNX Runtime would load them; a provider that cannot be loaded is not requested, and one log line
says which providers are used and why the others were skipped.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import tempfile
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agent.core import onnx_graph
from agent.core.package import ModelPackage
from agent.errors import ModelLoadError
from agent.runtime.base import TensorSpec

log = logging.getLogger(__name__)

ORT_NAMES = {"tensorrt": "TensorrtExecutionProvider", "cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}
ACCELERATORS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
#: The shared library ONNX Runtime dlopens for each GPU provider (in onnxruntime/capi), and the CUDA driver.
PROVIDER_LIBRARIES = {"TensorrtExecutionProvider": "libonnxruntime_providers_tensorrt.so",
                      "CUDAExecutionProvider": "libonnxruntime_providers_cuda.so"}
CUDA_DRIVER = "libcuda.so.1"
_OPT_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
               "all": "ORT_ENABLE_ALL"}


@dataclass(frozen=True)
class OnnxRuntimeOptions:
    providers: tuple[str, ...] = ("auto",)
    require_accelerator: bool = False
    intra_op_threads: int = 0
    inter_op_threads: int = 0
    allow_spinning: bool = False
    cache_dir: Path | None = None


class OnnxSession:
    """A loaded onnxruntime.InferenceSession; InferenceSession.run is thread-safe and drops the GIL."""

    def __init__(self, session: Any, provider_note: str) -> None:
        self._session = session
        self.inputs = [TensorSpec(i.name, tuple(i.shape), i.type) for i in session.get_inputs()]
        self.outputs = [TensorSpec(o.name, tuple(o.shape), o.type) for o in session.get_outputs()]
        self.providers: list[str] = list(session.get_providers())
        self.provider_note = provider_note

    def predict(self, feeds: Mapping[str, np.ndarray], output_names: Sequence[str]) -> list[np.ndarray]:
        session = self._session
        if session is None:
            raise RuntimeError("session was unloaded")
        return list(session.run(list(output_names), dict(feeds)))

    def unload(self) -> None:
        # Dropping the last reference frees the native session (and its GPU memory).
        self._session = None


class OnnxRuntime:
    """ModelRuntime over onnxruntime."""

    def __init__(self, options: OnnxRuntimeOptions) -> None:
        self.options = options
        self._unloadable: dict[str, str] | None = None  # GPU provider → why it can't load here (probed once)
        self._probe_lock = threading.Lock()

    def unloadable_providers(self) -> dict[str, str]:
        """GPU providers this ONNX Runtime build lists but this machine cannot load, with the reason."""
        with self._probe_lock:
            if self._unloadable is None:
                import onnxruntime as ort

                self._unloadable = probe_gpu_providers(ort.get_available_providers(),
                                                       Path(os.path.dirname(ort.__file__)) / "capi")
                usable = [p for p in ort.get_available_providers() if p not in self._unloadable]
                by_reason: dict[str, list[str]] = {}
                for provider, why in self._unloadable.items():
                    by_reason.setdefault(why, []).append(provider)
                skipped = "".join(f"; {', '.join(names)} never requested: {why}" for why, names in by_reason.items())
                log.info("ONNX Runtime execution providers usable on this machine: %s%s", ", ".join(usable), skipped)
            return self._unloadable

    def requested_providers(self, package: ModelPackage) -> list[str]:
        """Provider names to ask for, best first: config, else the package's choice, else all available;
        never a GPU provider whose libraries cannot be loaded here (see unloadable_providers)."""
        ort = import_onnxruntime()
        available = ort.get_available_providers()
        unloadable = self.unloadable_providers()
        wanted = self.options.providers
        if wanted == ("auto",):
            wanted = package.execution.providers or ("tensorrt", "cuda", "cpu")
            names = [ORT_NAMES[p] for p in wanted if p in ORT_NAMES and ORT_NAMES[p] in available]
        else:
            names = [ORT_NAMES[p] for p in wanted]
        names = [n for n in names if n not in unloadable]
        if "CPUExecutionProvider" not in names and not self.options.require_accelerator:
            names.append("CPUExecutionProvider")
        return names

    def _wanted(self, package: ModelPackage) -> list[str]:
        """What the configuration asks for explicitly (not auto): a skipped one of these is a fallback."""
        if self.options.providers == ("auto",):
            return []
        return [ORT_NAMES[p] for p in self.options.providers]

    def _provider_options(self, name: str, package: ModelPackage) -> dict[str, Any]:
        if name == "TensorrtExecutionProvider":
            opts: dict[str, Any] = {"trt_fp16_enable": package.execution.trt_fp16}
            if self.options.cache_dir is not None:
                # Engines are tied to model, TensorRT version and GPU: key the cache by package fingerprint.
                cache = self.options.cache_dir / "tensorrt" / package.name / package.fingerprint
                cache.mkdir(parents=True, exist_ok=True)
                opts.update(trt_engine_cache_enable=True, trt_engine_cache_path=str(cache),
                            trt_timing_cache_enable=True, trt_timing_cache_path=str(cache))
            return opts
        if name == "CUDAExecutionProvider":
            return {"device_id": 0}
        return {}

    def load(self, package: ModelPackage) -> OnnxSession:
        ort = import_onnxruntime()
        requested = self.requested_providers(package)
        so = ort.SessionOptions()
        so.graph_optimization_level = getattr(
            ort.GraphOptimizationLevel, _OPT_LEVELS.get(package.execution.graph_optimization, "ORT_ENABLE_ALL"))
        so.intra_op_num_threads = self.options.intra_op_threads
        so.inter_op_num_threads = self.options.inter_op_threads
        so.log_severity_level = 3
        # Busy-waiting intra-op threads burn the cores the gRPC, pre- and post-processing threads need.
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.options.allow_spinning else "0")
        providers = [(n, self._provider_options(n, package)) for n in requested]
        session = open_session(ort, package.model_file, so, providers)
        used = list(session.get_providers())
        note = self._check_providers(package, requested, used)
        return OnnxSession(session, note)

    def _check_providers(self, package: ModelPackage, requested: list[str], used: list[str]) -> str:
        unloadable = self.unloadable_providers()
        # Asked for explicitly but skipped because its libraries don't load: as much a fallback as one
        # that ONNX Runtime itself could not create.
        skipped = [p for p in self._wanted(package) if p in unloadable and p not in requested]
        asked = skipped + requested if skipped else requested
        missing = [p for p in asked if p not in used]
        wanted_gpu = [p for p in asked if p in ACCELERATORS]
        on_gpu = [p for p in used if p in ACCELERATORS]
        reasons = "".join(f"; {p}: {unloadable[p]}" for p in missing if p in unloadable)
        if self.options.require_accelerator and not on_gpu:
            why = f"requested {wanted_gpu or 'no GPU provider'}, session uses {used}{reasons}"
            raise ModelLoadError(f"RequireAccelerator is set but no GPU execution provider could be used ({why}); "
                                 "check the CUDA/cuDNN/TensorRT libraries and that the agent's user may use the GPU")
        if missing:
            note = f"running on {used[0]}; requested {asked} but {missing} could not be used (CPU fallback)" \
                if not on_gpu else f"running on {used[0]}; {missing} could not be used"
            log.warning("model %s: %s%s", package.name, note, reasons)
            return note + reasons
        return f"running on {used[0]}"


def import_onnxruntime() -> Any:
    """The onnxruntime module, or a ModelLoadError saying how to install it (the core install has none)."""
    try:
        import onnxruntime
    except ImportError as exc:
        raise ModelLoadError("ONNX Runtime is not installed: install edge-agent[cpu] or edge-agent[gpu] "
                             "(on a Jetson, NVIDIA's onnxruntime-gpu wheel for its JetPack)") from exc
    return onnxruntime


# "Unsupported model IR version: 10, max supported IR version: 9" (onnxruntime/core/graph/model.cc)
_IR_REFUSED = re.compile(r"Unsupported model IR version: (\d+), max supported IR version: (\d+)")


def open_session(ort: Any, model_file: Path, sess_options: Any, providers: Sequence[Any]) -> Any:
    """ort.InferenceSession over model_file; a model whose IR version is newer than this ONNX Runtime reads
    (anomalib 2.x / torch >= 2.5 write IR 10; ONNX Runtime 1.16-1.17 on JetPack 5 read up to 9) is loaded with the
    older IR version when it uses nothing that version lacks. Anything else it cannot load is a ModelLoadError
    that says why."""
    name = model_file.name
    try:
        return ort.InferenceSession(str(model_file), sess_options=sess_options, providers=list(providers))
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types
        refused = _IR_REFUSED.search(str(exc))
        if not refused:
            raise ModelLoadError(f"ONNX Runtime could not load {name}: {_ort_reason(exc, ort.__version__)}") from exc
    model_ir, max_ir = int(refused.group(1)), int(refused.group(2))
    data = model_file.read_bytes()
    newer = onnx_graph.newer_ir_features(data)
    if newer:
        raise ModelLoadError(
            f"{name} is ONNX IR version {model_ir} and ONNX Runtime {ort.__version__} reads up to IR {max_ir}; it "
            f"cannot be loaded as IR {max_ir} because it uses {', '.join(newer)}. Re-export the model without "
            f"those (IR <= {max_ir}, ONNX opset <= the one this ONNX Runtime supports), or serve it with a newer "
            "ONNX Runtime (JetPack 6 / x86 with edge-agent[cpu] or [gpu])")
    log.info("%s: ONNX IR version %d is newer than ONNX Runtime %s reads (%d) but the graph uses nothing newer "
             "than IR 9; loading it as IR %d", name, model_ir, ort.__version__, max_ir, max_ir)
    patched = onnx_graph.with_ir_version(data, max_ir)
    del data
    try:
        return _session_from_patched(ort, model_file, patched, sess_options, providers)
    except Exception as exc:
        raise ModelLoadError(f"ONNX Runtime {ort.__version__} could not load {name} (ONNX IR version {model_ir}, "
                             f"loaded as IR {max_ir}): {_ort_reason(exc, ort.__version__)}") from exc


def _session_from_patched(ort: Any, model_file: Path, patched: bytes, sess_options: Any,
                          providers: Sequence[Any]) -> Any:
    externals = onnx_graph.read_signature(patched, model_file.name).external_files
    if not externals:
        return ort.InferenceSession(patched, sess_options=sess_options, providers=list(providers))
    # ONNX Runtime resolves external data beside the model file, and a model given as bytes has none. ONNX Runtime
    # 1.16-1.17 (the ones that need this for IR 10) accept the patched model in a scratch directory with links to
    # the weight files (nothing is copied); newer ones refuse links that leave that directory but take the weights'
    # folder as a session option instead.
    try:
        with tempfile.TemporaryDirectory(prefix="edge-agent-ir-") as tmp:
            copy = Path(tmp) / model_file.name
            copy.write_bytes(patched)
            for rel in externals:
                link = Path(tmp) / rel
                link.parent.mkdir(parents=True, exist_ok=True)
                os.symlink(model_file.parent.resolve() / rel, link)
            return ort.InferenceSession(str(copy), sess_options=sess_options, providers=list(providers))
    except Exception as exc:
        if "External data path" not in str(exc):
            raise
    sess_options.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                          str(model_file.parent.resolve()))
    return ort.InferenceSession(patched, sess_options=sess_options, providers=list(providers))


# ONNX Runtime prefixes its messages with the C++ source location and signature; the reason follows them.
_ORT_PREFIX = re.compile(r"^.*? failed:\S+:\d+ [^()]*\([^()]*\)\s*", re.S)
_OPSET_LIMIT = re.compile(r"support for domain ai\.onnx is till opset (\d+)")


def _ort_reason(exc: BaseException, version: str) -> str:
    """ONNX Runtime's reason for refusing a model, without its C++ prefix; an operator set that is too new gets
    the opset to re-export with."""
    text = str(exc).strip()
    limit = _OPSET_LIMIT.search(text)
    if limit:
        top = limit.group(1)
        return (f"ONNX Runtime {version} supports ONNX opsets up to {top} and the model needs a newer one; re-export "
                f"it with opset_version={top} or lower (torch.onnx.export / anomalib export argument opset_version)")
    reason = _ORT_PREFIX.sub("", text, count=1).splitlines()
    return reason[0] if reason else type(exc).__name__


def check_loadable(model_file: Path) -> None:
    """Let ONNX Runtime (CPU, no graph optimisation) read the model: the check `model build` makes instead of
    onnx.checker, which a device install does not have. ModelLoadError says what is wrong."""
    ort = import_onnxruntime()
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    open_session(ort, model_file, so, ["CPUExecutionProvider"])


class OnnxProbe:
    """core.package.ModelProbe with ONNX Runtime on the CPU: what `model build` and packaging jobs check a
    model with before they write a package."""

    def check(self, model_file: Path) -> None:
        check_loadable(model_file)

    def run(self, model_file: Path, feeds: Mapping[str, np.ndarray], outputs: Sequence[str]) -> list[np.ndarray]:
        ort = import_onnxruntime()
        session = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
        return [np.asarray(v) for v in session.run(list(outputs), dict(feeds))]


def probe_gpu_providers(available: Sequence[str], capi_dir: Path) -> dict[str, str]:
    """GPU provider → the loader's reason it cannot be used, for each listed provider whose library (or the
    CUDA driver) fails to load. A provider library that is not where this build keeps it is left to ONNX
    Runtime to judge. Loading a library ONNX Runtime would load anyway has no other effect."""
    unloadable: dict[str, str] = {}
    gpu = [p for p in available if p in PROVIDER_LIBRARIES]
    if not gpu:
        return unloadable
    try:
        ctypes.CDLL(CUDA_DRIVER)
    except OSError as exc:
        return {p: f"no CUDA driver ({_first_line(exc)})" for p in gpu}
    for provider in gpu:
        library = capi_dir / PROVIDER_LIBRARIES[provider]
        if not library.exists():
            continue
        try:
            ctypes.CDLL(str(library))
        except OSError as exc:
            unloadable[provider] = f"its libraries do not load ({_first_line(exc)})"
    return unloadable


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
