"""Once-for-All's MobileNetV3 supernets (`ofa_mbv3_d234_e346_k357_w1.0`, `w1.2`) as hwnas checkpoints.

hwnas's `mbv3-224` space is OFA's MobileNetV3 space, and its dynamic ops compute what OFA's do:
the same centre crops of the largest kernel, passed through the same learned kernel-transform
matrices (`F.linear` of the crop's k*k taps, shared by the channels), the first C channels of every
elastic width, BN statistics sliced the same way. So a published OFA supernet is an hwnas supernet
under other names, and the import is a renaming, checked tensor by tensor, not a conversion:

- OFA's `blocks.0` is MobileNetV3's fixed first block (hwnas `first`); OFA keeps four blocks per
  stage as hwnas does, so `blocks.{1 + 4 s + i}` is block `i` of stage `s` (`stages.s.i`).
- A depthwise conv's `7to5_matrix` and `5to3_matrix` are `dw_conv.transforms["7to5"]` and
  `["5to3"]` as they are (`Supernet(space, kernel_transform=True)`).
- BN affine parameters and running statistics copy as they are.
- Older OFA files name the blocks' layer `mobile_inverted_conv`, and some drop or double a `.bn`,
  `.conv` or `.linear` level; OFA's own `load_state_dict` accepts those aliases, so does this. Unlike
  OFA's loader, a missing key is an error here (OFA's silently keeps the random initial value).

A state dict does not say which choices it was trained for: the intermediate checkpoints of OFA's
progressive shrinking (`..._e46_...`, `..._d34_...`) have the very same keys and shapes as the final
`d234_e346_k357` one. The file name does, when it is OFA's, and a name naming other settings is
warned about; the imported checkpoint records the file's name, size and sha256.
"""

from __future__ import annotations

import datetime
import os
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hwnas import spaces
from hwnas.arch import Arch
from hwnas.checkpoint import FORMAT, VERSION, load_supernet, save_checkpoint, why_unreadable
from hwnas.errors import CheckpointError, HwnasError
from hwnas.fileio import file_sha256
from hwnas.provenance import git_commit
from hwnas.space import SearchSpace
from hwnas.supernet import Supernet

Log = Callable[[str], None]

# OFA's width multiplier -> the hwnas preset of the same network
OFA_PRESETS: dict[str, str] = {"1.0": "mbv3-224", "1.2": "mbv3-224-w1.2"}
OFA_SETTINGS = "d234_e346_k357"  # the depth, expand and kernel choices of OFA's final supernets
OFA_NAME = re.compile(r"ofa_mbv3_(d\d+)_(e\d+)_(k\d+)_w(\d+(?:\.\d+)?)")
STEM_KEY = "first_conv.conv.weight"
CLASSIFIER_KEY = "classifier.linear.weight"
_BN_FIELDS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
_COUNTER = "num_batches_tracked"


def _stderr_warning(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _bn(ofa: str, ours: str) -> dict[str, str]:
    return {f"{ofa}.{name}": f"{ours}.{name}" for name in _BN_FIELDS}


def ofa_key_map(space: SearchSpace) -> dict[str, str]:
    """OFA's state-dict key -> hwnas's, for every tensor of the supernet of `space` (an OFA-MBv3 preset).

    The keys are those of the `ofa` package's `OFAMobileNetV3.state_dict()` (version 0.1.0.post2023...).
    """
    keys = {"first_conv.conv.weight": "stem.0.weight", **_bn("first_conv.bn", "stem.1"),
            "blocks.0.conv.depth_conv.conv.weight": "first.depthwise.0.weight",
            **_bn("blocks.0.conv.depth_conv.bn", "first.depthwise.1"),
            "blocks.0.conv.point_linear.conv.weight": "first.project.0.weight",
            **_bn("blocks.0.conv.point_linear.bn", "first.project.1")}
    kernels = sorted(space.kernel_choices)
    for s, stage in enumerate(space.stages):
        for i in range(space.max_depth):
            ofa, ours = f"blocks.{1 + s * space.max_depth + i}.conv", f"stages.{s}.{i}"
            keys[f"{ofa}.inverted_bottleneck.conv.conv.weight"] = f"{ours}.expand_conv.weight"
            keys.update(_bn(f"{ofa}.inverted_bottleneck.bn.bn", f"{ours}.expand_bn"))
            keys[f"{ofa}.depth_conv.conv.conv.weight"] = f"{ours}.dw_conv.weight"
            for large, small in zip(kernels[1:], kernels[:-1], strict=True):
                keys[f"{ofa}.depth_conv.conv.{large}to{small}_matrix"] = f"{ours}.dw_conv.transforms.{large}to{small}"
            keys.update(_bn(f"{ofa}.depth_conv.bn.bn", f"{ours}.dw_bn"))
            if stage.se:
                for part in ("reduce", "expand"):
                    for name in ("weight", "bias"):
                        keys[f"{ofa}.depth_conv.se.fc.{part}.{name}"] = f"{ours}.se.{part}_{name}"
            keys[f"{ofa}.point_linear.conv.conv.weight"] = f"{ours}.project_conv.weight"
            keys.update(_bn(f"{ofa}.point_linear.bn.bn", f"{ours}.project_bn"))
    keys.update({"final_expand_layer.conv.weight": "head.final_expand.0.weight",
                 **_bn("final_expand_layer.bn", "head.final_expand.1"),
                 "feature_mix_layer.conv.weight": "head.feature_mix.0.weight",
                 "classifier.linear.weight": "head.classifier.weight",
                 "classifier.linear.bias": "head.classifier.bias"})
    return keys


def _alias_free(key: str) -> str:
    """A key with OFA's naming variants folded away (see the module doc): two spellings of one tensor agree."""
    key = key.replace(".mobile_inverted_conv.", ".conv.")
    for part in ("bn", "conv", "linear"):
        key = key.replace(f".{part}.{part}.", f".{part}.")
    return key


def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(d) for d in t.shape) + ")"


def read_ofa_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of an OFA file: a bare state dict, or OFA's checkpoint dict holding one under "state_dict".

    Read with `weights_only=True`: a file from elsewhere runs no pickled code. A DataParallel
    `module.` prefix on every key is dropped.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises RuntimeError, UnpicklingError, EOFError, ... for a bad file
        raise CheckpointError(f"{path}: not a readable torch file ({why_unreadable(exc)})") from None
    if isinstance(obj, Mapping) and obj.get("format") == FORMAT:
        raise CheckpointError(f"{path}: already an hwnas supernet checkpoint; pass it to 'hwnas search --supernet'")
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"{path}: neither a state dict nor OFA's checkpoint dict with a 'state_dict' key "
                              f"(found {type(obj).__name__}{' (empty)' if isinstance(obj, Mapping) else ''})")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: the state dict holds a non-tensor entry {bad[0]!r}")
    state = dict(obj)
    if all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


@dataclass
class Converted:
    """An OFA state dict as an hwnas supernet, and what the conversion noticed on the way."""

    supernet: Supernet
    width: str
    filled_counters: list[str] = field(default_factory=list)  # BN batch counters the file lacked, set to 0


def _widths() -> dict[int, str]:
    """Stem width -> OFA width multiplier: the stem is where w1.0 and w1.2 first differ."""
    return {spaces.get(name).stem_channels: width for width, name in OFA_PRESETS.items()}


def convert_state_dict(state: Mapping[str, torch.Tensor], width: str | None = None, *,
                       where: str = "state dict") -> Converted:
    """An hwnas `Supernet` (kernel transforms on) holding the tensors of an OFA MobileNetV3 state dict.

    `width` ("1.0" or "1.2") is read off the stem when not given; a given one that the tensors
    contradict is refused. The number of classes is read off the classifier. Any key missing, any
    extra key, a wrong shape or a non-finite value is refused in one `CheckpointError` naming the
    key; BN batch counters (`num_batches_tracked`, which no output depends on and older torch did
    not save) are the one thing filled in (with 0) when absent.
    """
    if width is not None and width not in OFA_PRESETS:
        raise HwnasError(f"--width must be one of {', '.join(OFA_PRESETS)}, got {width!r}")
    incoming: dict[str, tuple[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        folded = _alias_free(key)
        if folded in incoming:
            raise CheckpointError(f"{where}: keys '{incoming[folded][0]}' and '{key}' name the same tensor under "
                                  "OFA's aliases")
        incoming[folded] = (key, tensor)
    stem = incoming.get(_alias_free(STEM_KEY))
    if stem is None:
        raise CheckpointError(f"{where}: missing key '{STEM_KEY}': not an OFA MobileNetV3 supernet")
    found = _widths().get(int(stem[1].shape[0])) if stem[1].dim() == 4 else None
    if found is None:
        raise CheckpointError(f"{where}: key '{stem[0]}' has shape {_shape(stem[1])}; OFA MobileNetV3 has "
                              + " or ".join(f"({c}, 3, 3, 3) (w{w})" for c, w in _widths().items()) + " there")
    if width is not None and width != found:
        expected = spaces.get(OFA_PRESETS[width]).stem_channels
        raise CheckpointError(f"{where}: --width {width} expects key '{stem[0]}' of shape ({expected}, 3, 3, 3); "
                              f"it has {_shape(stem[1])}, a w{found} supernet (pass --width {found} or leave it out)")
    classifier = incoming.get(_alias_free(CLASSIFIER_KEY))
    num_classes = int(classifier[1].shape[0]) if classifier is not None and classifier[1].dim() == 2 else 1000
    space = spaces.get(OFA_PRESETS[found], num_classes=max(num_classes, 1))
    net = Supernet(space, kernel_transform=True)
    expected_tensors = net.state_dict()
    key_map = ofa_key_map(space)
    if set(key_map.values()) != set(expected_tensors):  # the map and the supernet were written apart
        raise RuntimeError(f"ofa_key_map does not cover Supernet({space.name}): "
                           f"{sorted(set(key_map.values()) ^ set(expected_tensors))[:3]}")
    label = f"OFA MobileNetV3 w{found} ({OFA_SETTINGS})"
    folded_map = {_alias_free(ofa): ofa for ofa in key_map}
    missing = [ofa for folded, ofa in folded_map.items() if folded not in incoming and not ofa.endswith(_COUNTER)]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{where}: does not fit {label}: missing key '{missing[0]}'{more}")
    extra = [original for folded, (original, _) in incoming.items() if folded not in folded_map]
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise CheckpointError(f"{where}: does not fit {label}: unexpected key '{extra[0]}'{more}")
    converted: dict[str, torch.Tensor] = {}
    filled: list[str] = []
    for folded, ofa in folded_map.items():
        ours = key_map[ofa]
        target = expected_tensors[ours]
        if folded not in incoming:
            converted[ours] = torch.zeros_like(target)
            filled.append(ofa)
            continue
        original, tensor = incoming[folded]
        if tuple(tensor.shape) != tuple(target.shape):
            raise CheckpointError(f"{where}: does not fit {label}: key '{original}' has shape {_shape(tensor)}, "
                                  f"expected {_shape(target)}")
        if target.is_floating_point():
            if not tensor.is_floating_point():
                raise CheckpointError(f"{where}: key '{original}' holds {tensor.dtype} values, expected floats")
            if not bool(torch.isfinite(tensor).all()):
                raise CheckpointError(f"{where}: key '{original}' holds NaN or infinite values")
        converted[ours] = tensor.detach().to(target.dtype).clone()
    net.load_state_dict(converted, strict=True)
    return Converted(net.eval(), found, filled)


def ofa_subnet_settings(space: SearchSpace, arch: Arch) -> dict[str, list[Any]]:
    """`arch` as OFA's `set_active_subnet` arguments (and its tutorial's sample dict, less the resolution): a
    kernel and an expand ratio for every one of a stage's `max_depth` blocks (the inactive ones are ignored by
    OFA, set to the smallest choice here), and the depths."""
    ks: list[int] = []
    es: list[Any] = []
    i = 0
    for depth in arch.depths:
        for j in range(space.max_depth):
            if j < depth:
                ks.append(arch.kernels[i])
                es.append(arch.expands[i])
                i += 1
            else:
                ks.append(min(space.kernel_choices))
                es.append(min(space.expand_choices))
    return {"ks": ks, "e": es, "d": list(arch.depths)}


def arch_from_ofa(space: SearchSpace, sample: Mapping[str, Any]) -> Arch:
    """An OFA sample dict (`{'ks', 'e', 'd', 'r'}`, as OFA's tutorial `ArchManager` makes) as an arch of `space`:
    the first `d` blocks of each stage."""
    kernels: list[int] = []
    expands: list[Any] = []
    for stage, depth in enumerate(sample["d"]):
        first = stage * space.max_depth
        kernels.extend(sample["ks"][first:first + depth])
        expands.extend(sample["e"][first:first + depth])
    resolution = sample["r"][0] if isinstance(sample["r"], (list, tuple)) else sample["r"]
    return Arch(space.name, int(resolution), tuple(sample["d"]), tuple(kernels), tuple(expands))


def ofa_version() -> str | None:
    """The `ofa` package installed here, if any: the version whose layout this import was checked against."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ofa")
    except PackageNotFoundError:
        return None


def _check_out(out: Path, checkpoint: Path, force: bool) -> None:
    """Refuse, before the OFA file is read, an `out` that cannot or may not be written."""
    if out.is_dir():
        raise HwnasError(f"--out {out} is a directory; name the checkpoint file to write, e.g. {out / 'supernet.pt'}")
    if out.exists() and checkpoint.exists() and out.resolve() == checkpoint.resolve():
        raise HwnasError(f"--out {out} is the OFA file itself; choose another --out")
    if out.exists() and not force:
        raise HwnasError(f"--out {out} exists; pass --force to overwrite it or choose another --out")
    ancestor = out.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise HwnasError(f"--out {out}: {ancestor} is a file, not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise HwnasError(f"--out {out}: cannot write into {ancestor} (permission denied)")


@dataclass
class OfaImport:
    """What `import_ofa` wrote: the checkpoint, its space, and the provenance recorded in it."""

    out: Path
    space: SearchSpace
    tensors: int
    source: dict[str, Any]


def import_ofa(checkpoint: str | Path, out: str | Path, *, width: str | None = None, force: bool = False,
               warn: Log = _stderr_warning) -> OfaImport:
    """Write OFA MobileNetV3 supernet `checkpoint` as the hwnas supernet checkpoint `out` (`load_supernet` reads it).

    The checkpoint records where it came from ("imported_from": file name, size, sha256, width,
    the settings OFA's file name states, the `ofa` package installed here, date, hwnas commit).
    It carries no dataset: search and export need `--data` (the ImageNet-style image folder).
    Nothing is written unless the whole state dict fits; an existing `out` needs `force`.
    """
    checkpoint, out = Path(checkpoint), Path(out)
    _check_out(out, checkpoint, force)
    converted = convert_state_dict(read_ofa_state_dict(checkpoint), width, where=str(checkpoint))
    space = converted.supernet.space
    named = OFA_NAME.search(checkpoint.name)
    name_settings = "_".join(named.groups()[:3]) if named else None
    if name_settings is not None and name_settings != OFA_SETTINGS:
        warn(f"{checkpoint.name} names OFA settings {name_settings}, not {OFA_SETTINGS}: an intermediate supernet of "
             "progressive shrinking has the same tensors, but its other choices were not trained")
    if named and named.group(4) not in (converted.width, converted.width.rstrip("0").rstrip(".")):
        warn(f"{checkpoint.name} names width {named.group(4)}, but its tensors are those of w{converted.width}")
    if converted.filled_counters:
        warn(f"{len(converted.filled_counters)} BN batch counters (num_batches_tracked) were absent and set to 0")
    source = {
        "kind": "once-for-all", "file": checkpoint.name, "bytes": checkpoint.stat().st_size,
        "sha256": file_sha256(checkpoint), "width": converted.width, "settings": OFA_SETTINGS,
        "settings_in_file_name": name_settings, "ofa_package_here": ofa_version(),
        "num_classes": space.num_classes, "filled_counters": len(converted.filled_counters),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"), "hwnas_commit": git_commit(),
    }
    model = converted.supernet.state_dict()
    state = {"format": FORMAT, "version": VERSION, "space": space.to_dict(),
             "supernet_config": {"kernel_transform": True}, "model": model, "train_config": {}, "epoch": 0,
             "complete": True, "imported_from": source}
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        save_checkpoint(out, state)
    except OSError as exc:
        raise HwnasError(f"--out {out}: cannot write it ({exc.strerror or exc})") from None
    loaded, _ = load_supernet(out, space_name=space.name)  # what search and export will read
    mismatched = [k for k, v in loaded.state_dict().items() if not torch.equal(v, model[k])]
    if mismatched:
        raise RuntimeError(f"{out}: tensor {mismatched[0]} did not survive the round trip")
    return OfaImport(out, space, len(model), source)


__all__ = ["OFA_PRESETS", "OFA_SETTINGS", "Converted", "OfaImport", "convert_state_dict", "import_ofa",
           "ofa_key_map", "read_ofa_state_dict"]
