"""ONNX export of hwnas subnets: checked by onnx.checker, compared with torch in ONNX Runtime, and
carrying its `Arch` (and whatever the caller knows: budget, predicted latency, accuracy) in the
model's metadata, so that a deployed file says what it is without the search results beside it.

The export goes through torch's TorchScript-based exporter (`dynamo=False`). torch 2.9+ defaults
to the torch.export-based exporter, but that one needs `onnxscript`, which hwnas does not depend
on. The TorchScript path needs no extra package, handles every layer these networks use (conv, BN,
activations, pooling, linear) at opset 17, and folds BatchNorm into the convolutions.
"""

from __future__ import annotations

import contextlib
import copy
import os
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from google.protobuf.message import DecodeError
from torch import nn

from hwnas.errors import ArchError, ExportError
from hwnas.space import Arch

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
METADATA_PREFIX = "hwnas."
_RESERVED = ("arch", "space", "arch_id")


@dataclass
class OnnxExport:
    """What `export_onnx` wrote and how well ONNX Runtime reproduced torch on it."""

    path: Path
    opset: int
    max_abs_diff: float
    metadata: dict[str, str] = field(default_factory=dict)


def export_module(module: nn.Module, path: str | Path, input_shape: tuple[int, int, int], *, batch_size: int = 1,
                  dynamic_batch: bool = True, opset: int = 17, output_name: str = "output") -> Path:
    """Export any module as it runs at inference (eval mode, fp32), with no checks.

    The latency profiler times single blocks through this, so it must stay cheap; the module is
    copied, so the caller's training mode, dtype and device are left as they were.
    """
    path = Path(path)
    shape = _check_shape(input_shape)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    model = _inference_copy(module)
    dummy = torch.randn(batch_size, *shape, generator=torch.Generator().manual_seed(0))
    dynamic_axes = {INPUT_NAME: {0: "batch"}, output_name: {0: "batch"}} if dynamic_batch else None
    path.parent.mkdir(parents=True, exist_ok=True)
    with _quiet_legacy_exporter(), torch.no_grad():
        try:
            torch.onnx.export(model, (dummy,), str(path), dynamo=False, opset_version=opset,
                              input_names=[INPUT_NAME], output_names=[output_name], dynamic_axes=dynamic_axes,
                              do_constant_folding=True, export_params=True)
        except Exception as exc:  # torch raises many types here; the user needs the file and the reason
            raise ExportError(f"{path}: torch.onnx.export failed: {_first_line(exc)}") from exc
    return path


def export_onnx(module: nn.Module, arch: Arch, path: str | Path, *, input_shape: tuple[int, int, int] | None = None,
                metadata: Mapping[str, str] | None = None, opset: int = 17, batch_size: int = 1,
                dynamic_batch: bool = True, atol: float = 1e-4, check_inputs: torch.Tensor | None = None,
                simplify: bool = True) -> OnnxExport:
    """Export a subnet for deployment, and refuse to leave a file that does not compute what torch does.

    The file appears at `path` only once onnx.checker (full check) passed and ONNX Runtime matched
    torch within `atol` on `check_inputs` (seeded random inputs by default, at a batch size other
    than the traced one when the batch is dynamic, so the dynamic axis is exercised too). With
    `simplify`, the graph is also passed through onnxslim (constant folding, dead-node and
    redundant-op removal) and the simpler graph is kept only if it passes the same checks; what
    happened is recorded in the `hwnas.simplified` metadata either way.
    """
    path = Path(path)
    shape = _check_shape(input_shape if input_shape is not None else _default_input_shape(module, arch))
    props = _metadata(arch, metadata)
    if check_inputs is None:
        check_batch = batch_size + 2 if dynamic_batch else batch_size
        check_inputs = torch.randn(check_batch, *shape, generator=torch.Generator().manual_seed(1234))
    elif tuple(check_inputs.shape[1:]) != shape:
        raise ValueError(f"check_inputs have shape {tuple(check_inputs.shape)}, the export expects (N, *{shape})")

    path.parent.mkdir(parents=True, exist_ok=True)
    with _temporary_beside(path) as tmp:
        export_module(module, tmp, shape, batch_size=batch_size, dynamic_batch=dynamic_batch, opset=opset,
                      output_name=OUTPUT_NAME)
        model = onnx.load(str(tmp))
        _set_metadata(model, props)
        try:
            onnx.checker.check_model(model, full_check=True)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
            raise ExportError(f"{path}: the exported model fails onnx.checker: {_first_line(exc)}") from None
        session = _session(model.SerializeToString(), threads=None, providers=None)
        diff = _max_abs_diff(module, session, check_inputs)
        if not diff <= atol:  # also catches NaN
            raise ExportError(f"{path}: ONNX Runtime differs from torch by {diff:.3g} (> atol {atol:g}); "
                              "the file was not written")
        if simplify:
            model, diff, props[METADATA_PREFIX + "simplified"] = _simplified(model, module, check_inputs, atol, diff)
        props[METADATA_PREFIX + "ort_max_abs_diff"] = f"{diff:.3e}"
        _set_metadata(model, props)
        onnx.save(model, str(tmp))
        os.replace(tmp, path)
    return OnnxExport(path=path, opset=opset, max_abs_diff=diff, metadata=props)


def _simplified(model: onnx.ModelProto, module: nn.Module, inputs: torch.Tensor, atol: float,
                diff: float) -> tuple[onnx.ModelProto, float, str]:
    """The onnxslim-simplified model if it still passes the checker and parity, else the model as it was."""
    try:
        import onnxslim
    except ImportError:
        return model, diff, "no (onnxslim is not installed)"
    before = len(model.graph.node)
    try:
        slim = onnxslim.slim(onnx.ModelProto.FromString(model.SerializeToString()))
        onnx.checker.check_model(slim, full_check=True)
        slim_diff = _max_abs_diff(module, _session(slim.SerializeToString(), threads=None, providers=None), inputs)
    except Exception as exc:  # noqa: BLE001 - a failed simplification must not fail the export
        return model, diff, f"no (onnxslim failed: {_first_line(exc)})"
    if not slim_diff <= atol:
        return model, diff, f"no (the simplified graph differs from torch by {slim_diff:.3g})"
    version = getattr(onnxslim, "__version__", "?")
    return slim, slim_diff, f"onnxslim {version}: {before} -> {len(slim.graph.node)} nodes"


def read_metadata(path: str | Path) -> dict[str, str]:
    """All metadata_props of an ONNX file (hwnas writes its own under the `hwnas.` prefix)."""
    path = Path(path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except FileNotFoundError:
        raise ExportError(f"{path}: no such ONNX file") from None
    except (OSError, DecodeError, ValueError) as exc:
        raise ExportError(f"{path}: not a readable ONNX file ({_first_line(exc)})") from None
    return {prop.key: prop.value for prop in model.metadata_props}


def set_metadata(path: str | Path, props: Mapping[str, str]) -> None:
    """Add or replace metadata of an exported file (prefixed `hwnas.` unless already), rewritten atomically.

    What is known only after export (accuracy in ONNX Runtime, measured latency) goes in this way,
    so the file that ships carries every figure that was checked on it.
    """
    path = Path(path)
    model = onnx.load(str(path)) if path.is_file() else None
    if model is None:
        raise ExportError(f"{path}: no such ONNX file")
    prefixed = {(k if k.startswith(METADATA_PREFIX) else METADATA_PREFIX + k): str(v) for k, v in props.items()}
    _set_metadata(model, prefixed)
    with _temporary_beside(path) as tmp:
        onnx.save(model, str(tmp))
        os.replace(tmp, path)


def read_arch(path: str | Path) -> Arch:
    """The arch an hwnas export was made from, so a deployed file can be traced back to its search."""
    props = read_metadata(path)
    key = METADATA_PREFIX + "arch"
    if key not in props:
        raise ExportError(f"{path}: no '{key}' in the ONNX metadata; the file was not exported by hwnas")
    try:
        return Arch.from_json(props[key])
    except ArchError as exc:
        raise ExportError(f"{path}: '{key}' in the ONNX metadata is not a valid arch ({exc})") from None


def ort_session(path: str | Path, *, threads: int | None = None,
                providers: Sequence[str] | None = None) -> ort.InferenceSession:
    """A session set up for repeatable numbers: fixed intra-op threads, one inter-op thread,
    sequential execution and full graph optimisation. The CPU provider unless `providers` say otherwise,
    so parity and accuracy do not silently change with the onnxruntime wheel that happens to be installed."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path}: no such ONNX file")
    return _session(str(path), threads=threads, providers=providers)


def ort_parity(module: nn.Module, path: str | Path, inputs: torch.Tensor) -> float:
    """Largest absolute difference between torch (fp32, eval) and ONNX Runtime on `inputs`."""
    return _max_abs_diff(module, ort_session(path), inputs)


def ort_predict(session: ort.InferenceSession, images: np.ndarray | torch.Tensor, batch_size: int) -> np.ndarray:
    """Logits for all `images`, `batch_size` at a time, so accuracy can be measured in the deploy runtime.

    A model exported with a fixed batch runs at that batch (the last one padded), whatever
    `batch_size` says, since it accepts no other.
    """
    data = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    data = np.ascontiguousarray(data, dtype=np.float32)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    inp = session.get_inputs()[0]
    fixed = inp.shape[0] if isinstance(inp.shape[0], int) else None
    step = fixed or batch_size
    output_name = session.get_outputs()[0].name
    outputs = []
    for start in range(0, len(data), step):
        batch = data[start:start + step]
        n = len(batch)
        if fixed is not None and n < fixed:
            batch = np.concatenate([batch, np.zeros((fixed - n, *batch.shape[1:]), dtype=np.float32)])
        outputs.append(session.run([output_name], {inp.name: batch})[0][:n])
    if not outputs:
        return np.zeros((0,), dtype=np.float32)
    return np.concatenate(outputs)


# ---- helpers ----------------------------------------------------------------------------------------


def _check_shape(shape: Sequence[int]) -> tuple[int, int, int]:
    if len(shape) != 3 or any(int(d) < 1 for d in shape):
        raise ValueError(f"input_shape must be (C, H, W) of positive ints, got {tuple(shape)}")
    c, h, w = (int(d) for d in shape)
    return (c, h, w)


def _default_input_shape(module: nn.Module, arch: Arch) -> tuple[int, int, int]:
    """What a subnet of a space expects: its first convolution's channels at the arch's resolution."""
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d):
            return (layer.in_channels, arch.resolution, arch.resolution)
    raise ValueError("the module has no Conv2d to infer input channels from; pass input_shape")


def _inference_copy(module: nn.Module) -> nn.Module:
    return copy.deepcopy(module).float().cpu().eval()


def _metadata(arch: Arch, extra: Mapping[str, str] | None) -> dict[str, str]:
    props = {
        METADATA_PREFIX + "arch": arch.to_json(),
        METADATA_PREFIX + "space": arch.space,
        METADATA_PREFIX + "arch_id": arch.arch_id,
    }
    for key, value in (extra or {}).items():
        name = key if key.startswith(METADATA_PREFIX) else METADATA_PREFIX + key
        if name[len(METADATA_PREFIX):] in _RESERVED:
            raise ValueError(f"metadata key {key!r} is reserved: hwnas writes it from the arch")
        props[name] = str(value)
    return props


def _set_metadata(model: onnx.ModelProto, props: Mapping[str, str]) -> None:
    kept = [p for p in model.metadata_props if p.key not in props]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for key, value in props.items():
        model.metadata_props.add(key=key, value=value)


def _session(model: str | bytes, *, threads: int | None,
             providers: Sequence[str] | None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    chosen = list(providers) if providers is not None else ["CPUExecutionProvider"]
    missing = [p for p in chosen if p not in ort.get_available_providers()]
    if missing:
        raise ExportError(f"ONNX Runtime provider(s) {', '.join(missing)} not available here; "
                          f"available: {', '.join(ort.get_available_providers())}")
    return ort.InferenceSession(model, options, providers=chosen)


def _max_abs_diff(module: nn.Module, session: ort.InferenceSession, inputs: torch.Tensor) -> float:
    if inputs.ndim != 4 or len(inputs) == 0:
        raise ValueError(f"parity inputs must be a non-empty (N, C, H, W) batch, got shape {tuple(inputs.shape)}")
    model = _inference_copy(module)
    x = inputs.detach().cpu().float()
    with torch.no_grad():
        expected = model(x).numpy()
    got = ort_predict(session, x.numpy(), batch_size=len(x))
    if got.shape != expected.shape:
        raise ExportError(f"ONNX Runtime returned shape {got.shape}, torch {expected.shape}")
    return float(np.max(np.abs(got.astype(np.float64) - expected.astype(np.float64))))


@contextlib.contextmanager
def _temporary_beside(path: Path) -> Iterator[Path]:
    """A temporary name in the target's directory, so the final `os.replace` is atomic; removed on failure."""
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def _quiet_legacy_exporter() -> Iterator[None]:
    """The TorchScript exporter warns that it is deprecated on every call; we chose it knowingly (module docstring)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx")
        warnings.filterwarnings("ignore", message=r".*legacy TorchScript-based ONNX export.*")
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        yield


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
