"""Inference backends: the same deployable graph run by torch, onnxruntime or TensorRT.

Every backend runs :class:`PoseInferenceModule`, the network with its
preprocessing inside. Its contract, which is also the contract of the exported
ONNX / TorchScript files (see ``ros2_posenet.tools.export``):

* input ``image``: ``uint8`` tensor ``(B, crop, crop, 3)``, RGB, NHWC, already
  resized and centre-cropped by :meth:`ros2_posenet.preprocess.Preprocessor.geometric`
  (the cheap geometric step stays outside so it stays bit-identical to training);
* outputs ``position``: ``float32 (B, 3)`` camera centre in the map frame (metres),
  and ``orientation``: ``float32 (B, 4)`` unit quaternion ``(w, x, y, z)``, ``w >= 0``,
  of the camera-to-map rotation (optical camera frame), see :mod:`ros2_posenet.geometry`.

Scaling to [0, 1], ImageNet normalisation, the network and the quaternion
normalisation/canonicalisation all run inside the graph, so on a GPU only the
uint8 crop goes in and 7 numbers per image come back.
"""
from __future__ import annotations

import importlib.util
import io
import logging
import os
import warnings
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn as nn

from .geometry import quat_canonical, quat_normalize
from .model import PoseNet
from .preprocess import PreprocessConfig

log = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "onnxruntime", "tensorrt")
PRECISIONS = ("fp32", "fp16")
ONNX_INPUT = "image"
ONNX_OUTPUTS = ("position", "orientation")
ONNX_OPSET = 17
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")


class BackendUnavailableError(RuntimeError):
    """The requested backend / execution provider is not installed or cannot run here."""


class PoseInferenceModule(nn.Module):
    """uint8 RGB crops (B, crop, crop, 3) -> (position (B, 3), orientation (B, 4) wxyz), float32.

    Holds a *reference* to the given model (no copy), so changes to the model's
    weights are seen by the backend.
    """

    def __init__(self, model: PoseNet, preprocess: PreprocessConfig, half: bool = False):
        super().__init__()
        self.model = model
        self.half_precision = bool(half)
        self.register_buffer("mean", torch.tensor(preprocess.mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(preprocess.std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Normalise in fp32 (same arithmetic as Preprocessor.normalize), then cast for the network.
        x = image.permute(0, 3, 1, 2).float().div(255.0)
        x = (x - self.mean) / self.std
        if self.half_precision:
            x = x.half()
        t, q = self.model(x)
        return t.float(), quat_canonical(quat_normalize(q.float()))


def build_inference_module(model: PoseNet, preprocess: PreprocessConfig, precision: str = "fp32") -> PoseInferenceModule:
    """Wrap ``model`` (converted in place to fp16 when ``precision == 'fp16'``), in eval mode."""
    check_precision(precision)
    if precision == "fp16":
        model.half()
    return PoseInferenceModule(model, preprocess, half=precision == "fp16").eval()


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")


# ----------------------------------------------------------------------------- export


def example_input(crop: int, batch: int = 1, device: str | torch.device = "cpu") -> torch.Tensor:
    """A deterministic uint8 (batch, crop, crop, 3) image batch for tracing/warm-up."""
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (batch, crop, crop, 3), dtype=torch.uint8, generator=gen).to(device)


def export_onnx(module: PoseInferenceModule, crop: int, opset: int = ONNX_OPSET, metadata: dict[str, str] | None = None) -> bytes:
    """Serialise ``module`` to ONNX (dynamic batch axis) and return the model bytes.

    Uses the TorchScript-based exporter: the torch.export-based one needs the
    optional ``onnxscript`` package and gives the same graph for this network.
    """
    buffer = io.BytesIO()
    device = next(module.parameters()).device
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            module,
            (example_input(crop, device=device),),
            buffer,
            dynamo=False,
            opset_version=opset,
            input_names=[ONNX_INPUT],
            output_names=list(ONNX_OUTPUTS),
            dynamic_axes={ONNX_INPUT: {0: "batch"}, ONNX_OUTPUTS[0]: {0: "batch"}, ONNX_OUTPUTS[1]: {0: "batch"}},
        )
    return add_onnx_metadata(buffer.getvalue(), metadata or {})


def add_onnx_metadata(model_bytes: bytes, metadata: dict[str, str]) -> bytes:
    """Return the ONNX model with ``metadata`` stored as ``metadata_props``."""
    import onnx

    proto = onnx.load_from_string(model_bytes)
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = str(key), str(value)
    return proto.SerializeToString()


def export_torchscript(module: PoseInferenceModule, crop: int, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    """Trace ``module`` and save it as TorchScript, metadata in the ``metadata.json`` extra file."""
    import json

    device = next(module.parameters()).device
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated upstream but libtorch still loads it
        traced = torch.jit.trace(module, (example_input(crop, device=device),), check_trace=False)
        torch.jit.save(traced, str(path), _extra_files={"metadata.json": json.dumps(metadata or {})})
    return Path(path)


# ----------------------------------------------------------------------------- backends


class InferenceBackend(Protocol):
    """Runs the deployable graph: uint8 crops (B, c, c, 3) -> float32 (B, 3), (B, 4)."""

    name: str
    device: torch.device
    precision: str

    def infer(self, crops: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


class CudaGraphRunner:
    """One captured CUDA graph of the module for a fixed input shape.

    Batch-1 GoogLeNet is ~200 small kernels: launching them one by one from Python
    costs more than running them. Replaying a captured graph launches them all at
    once. The graph reads the module's parameters in place, so weight changes are seen.
    """

    def __init__(self, module: nn.Module, example: torch.Tensor):
        self.static_input = example.clone()
        side = torch.cuda.Stream(example.device)
        side.wait_stream(torch.cuda.current_stream(example.device))
        with torch.cuda.stream(side):  # warm-up off the default stream, as capture requires
            for _ in range(3):
                module(self.static_input)
        torch.cuda.current_stream(example.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            t, q = module(self.static_input)
            self.static_output = torch.cat((t, q), dim=1)

    def __call__(self, host: torch.Tensor) -> torch.Tensor:
        """(B, c, c, 3) uint8 in pinned host memory -> (B, 7) on the GPU (valid until the next call)."""
        self.static_input.copy_(host, non_blocking=True)
        self.graph.replay()
        return self.static_output


class TorchBackend:
    """Eager (or ``torch.compile``-d) PyTorch on CPU or CUDA.

    On CUDA the uint8 crop is staged in pinned memory, uploaded asynchronously and
    normalised on the GPU; position and orientation come back in one 7-float copy.
    Without ``compile``, batch-1 calls on CUDA replay a captured CUDA graph
    (``cuda_graph=True``; falls back to eager with a warning if capture fails).
    """

    name = "torch"

    def __init__(self, module: PoseInferenceModule, device: torch.device, precision: str = "fp32", compile: bool | str = False,
                 compile_backend: str = "inductor", cuda_graph: bool = True):
        self.device = device
        self.precision = precision
        self.module = module.to(device).eval()
        self.runner = self._compiled(compile, compile_backend) if compile else self.module
        self.use_graph = bool(cuda_graph and device.type == "cuda" and not compile)
        self._graph: CudaGraphRunner | None = None
        self._staging: torch.Tensor | None = None
        if device.type == "cuda":
            # Fixed input size: let cuDNN pick the fastest convolution algorithms once.
            torch.backends.cudnn.benchmark = True

    def _compiled(self, compile: bool | str, compile_backend: str):
        mode = compile if isinstance(compile, str) else ("reduce-overhead" if self.device.type == "cuda" else "default")
        if mode not in COMPILE_MODES:
            raise ValueError(f"compile mode must be one of {COMPILE_MODES}, got {mode!r}")
        if compile_backend != "inductor":
            return torch.compile(self.module, backend=compile_backend, dynamic=False)
        return torch.compile(self.module, mode=mode, dynamic=False)

    def _pinned(self, host: torch.Tensor) -> torch.Tensor:
        if self._staging is None or self._staging.shape != host.shape:
            self._staging = torch.empty(host.shape, dtype=torch.uint8).pin_memory()
        return self._staging.copy_(host)

    def _graph_for(self, staged: torch.Tensor) -> CudaGraphRunner | None:
        """The batch-1 graph, captured on first use; None for other shapes or after a failed capture."""
        if not self.use_graph or staged.shape[0] != 1:
            return None
        if self._graph is None or self._graph.static_input.shape != staged.shape:
            try:
                self._graph = CudaGraphRunner(self.module, staged.to(self.device))
            except RuntimeError as err:
                log.warning("CUDA graph capture failed (%s); running eagerly", err)
                self.use_graph = False
                return None
        return self._graph

    @torch.inference_mode()
    def infer(self, crops: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        host = torch.from_numpy(np.ascontiguousarray(crops))
        if self.device.type != "cuda":
            t, q = self.runner(host)
            out = torch.cat((t, q), dim=1)
        else:
            staged = self._pinned(host)
            graph = self._graph_for(staged)
            if graph is not None:
                out = graph(staged)
            else:
                t, q = self.runner(staged.to(self.device, non_blocking=True))
                out = torch.cat((t, q), dim=1)
        out = out.cpu().numpy()  # the only device->host copy (synchronises)
        return out[:, :3], out[:, 3:]


def session_options():
    """onnxruntime session options: CPU worker threads sleep instead of spinning between runs.

    On a 2-core robot the spinning threads steal the cores from the ROS executor and
    the other processes; on the shared 2-core benchmark machine turning spinning off
    made GoogLeNet's forward faster, not slower (bench/RESULTS.md).
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return options


class OnnxRuntimeBackend:
    """onnxruntime session over the exported graph (CPU, CUDA or TensorRT provider)."""

    def __init__(self, model: bytes | str | os.PathLike, providers: list, device: torch.device, precision: str, name: str = "onnxruntime"):
        import onnxruntime as ort

        self.name = name
        self.device = device
        self.precision = precision
        source = model if isinstance(model, bytes) else str(model)
        self.session = ort.InferenceSession(source, session_options(), providers=providers)
        self.providers = self.session.get_providers()

    def infer(self, crops: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        position, orientation = self.session.run(list(ONNX_OUTPUTS), {ONNX_INPUT: np.ascontiguousarray(crops, dtype=np.uint8)})
        return position, orientation


# ----------------------------------------------------------------------------- selection


def onnxruntime_providers() -> list[str]:
    """Execution providers of the installed onnxruntime ([] when it is not installed)."""
    if importlib.util.find_spec("onnxruntime") is None:
        return []
    import onnxruntime as ort

    return list(ort.get_available_providers())


def torch_tensorrt_available() -> bool:
    return importlib.util.find_spec("torch_tensorrt") is not None


def tensorrt_cache_dir() -> str:
    """Where TensorRT engines are cached (building one takes minutes; reuse it across starts)."""
    root = os.environ.get("ROS2_POSENET_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "ros2_posenet"))
    path = os.path.join(root, "tensorrt")
    os.makedirs(path, exist_ok=True)
    return path


def resolve_backend(backend: str, device: torch.device) -> str:
    """``auto``: ``torch`` on CUDA, ``onnxruntime`` on CPU when installed (else ``torch``).

    On CPU onnxruntime ran GoogLeNet faster than eager PyTorch and, unlike PyTorch's
    spinning OpenMP threads, stayed fast when other processes compete for the cores
    (bench/RESULTS.md). TensorRT is never picked automatically: building its engine
    takes minutes on first start. Other names pass through.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        return backend
    if device.type == "cuda" or not onnxruntime_providers():
        return "torch"
    return "onnxruntime"


def effective_precision(precision: str, device: torch.device) -> str:
    """fp16 needs a GPU; on CPU it falls back to fp32 with a warning (slower and no gain there)."""
    check_precision(precision)
    if precision == "fp16" and device.type != "cuda":
        log.warning("precision fp16 needs CUDA; running fp32 on %s", device)
        return "fp32"
    return precision


def onnxruntime_provider_list(device: torch.device, device_explicit: bool) -> list:
    """CUDA provider (+ CPU fallback) on a CUDA device, else CPU.

    An explicitly requested CUDA device without onnxruntime's CUDA provider is an error;
    with ``device='auto'`` it falls back to the CPU provider with a warning.
    """
    available = onnxruntime_providers()
    if not available:
        raise BackendUnavailableError("backend 'onnxruntime' needs the onnxruntime package (pip install onnxruntime or onnxruntime-gpu)")
    if device.type != "cuda":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in available:
        return [("CUDAExecutionProvider", {"device_id": device.index or 0}), "CPUExecutionProvider"]
    if device_explicit:
        raise BackendUnavailableError(
            f"backend 'onnxruntime' on {device} needs CUDAExecutionProvider (pip install onnxruntime-gpu); "
            f"installed providers: {available}"
        )
    log.warning("onnxruntime has no CUDAExecutionProvider (providers: %s); running it on the CPU", available)
    return ["CPUExecutionProvider"]


def tensorrt_provider_list(device: torch.device, precision: str) -> list:
    """TensorRT provider (with an engine cache) + CUDA and CPU fallbacks for unsupported nodes."""
    options = {
        "device_id": device.index or 0,
        "trt_fp16_enable": precision == "fp16",
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": tensorrt_cache_dir(),
    }
    providers: list = [("TensorrtExecutionProvider", options)]
    if "CUDAExecutionProvider" in onnxruntime_providers():
        providers.append(("CUDAExecutionProvider", {"device_id": device.index or 0}))
    return providers + ["CPUExecutionProvider"]


def create_backend(
    model: PoseNet,
    preprocess: PreprocessConfig,
    backend: str,
    device: torch.device,
    precision: str = "fp32",
    compile: bool | str = False,
    device_explicit: bool = False,
    onnx_metadata: dict[str, str] | None = None,
    cuda_graph: bool = True,
) -> InferenceBackend:
    """Build the requested backend around ``model`` (used in place for the torch backend).

    Raises :class:`BackendUnavailableError` with install advice when an explicitly
    requested backend cannot run on this machine.
    """
    name = resolve_backend(backend, device)
    precision = effective_precision(precision, device)
    if name == "torch":
        return TorchBackend(build_inference_module(model, preprocess, precision), device, precision, compile, cuda_graph=cuda_graph)
    if name == "onnxruntime":
        providers = onnxruntime_provider_list(device, device_explicit)
        ort_device = device if providers[0] != "CPUExecutionProvider" else torch.device("cpu")
        precision = effective_precision(precision, ort_device)
        graph = _onnx_bytes(model, preprocess, precision, onnx_metadata)
        return OnnxRuntimeBackend(graph, providers, ort_device, precision)
    return _tensorrt_backend(model, preprocess, device, precision)


def _onnx_bytes(model: PoseNet, preprocess: PreprocessConfig, precision: str, metadata: dict[str, str] | None) -> bytes:
    """Export on the fly, from a CPU copy so the caller's model keeps its device and dtype."""
    import copy

    cpu_model = copy.deepcopy(model).float().cpu()
    return export_onnx(build_inference_module(cpu_model, preprocess, precision), preprocess.crop, metadata=metadata)


def _tensorrt_backend(model: PoseNet, preprocess: PreprocessConfig, device: torch.device, precision: str) -> InferenceBackend:
    """onnxruntime's TensorRT provider if installed, else torch-tensorrt through ``torch.compile``."""
    if device.type != "cuda":
        raise BackendUnavailableError(f"backend 'tensorrt' needs a CUDA GPU (device is {device})")
    if "TensorrtExecutionProvider" in onnxruntime_providers():
        # TensorRT builds fp16 engines from the fp32 graph itself (trt_fp16_enable).
        graph = _onnx_bytes(model, preprocess, "fp32", None)
        return OnnxRuntimeBackend(graph, tensorrt_provider_list(device, precision), device, precision, name="tensorrt")
    if torch_tensorrt_available():
        import torch_tensorrt  # noqa: F401  (registers the torch.compile backend)

        module = build_inference_module(model, preprocess, precision)
        backend = TorchBackend(module, device, precision, compile=True, compile_backend="torch_tensorrt")
        backend.name = "tensorrt"
        return backend
    raise BackendUnavailableError(
        "backend 'tensorrt' needs onnxruntime-gpu with TensorrtExecutionProvider (and TensorRT libraries) "
        f"or torch-tensorrt; installed onnxruntime providers: {onnxruntime_providers() or 'none'}"
    )
