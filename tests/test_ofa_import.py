"""`hwnas import ofa`: an OFA MobileNetV3 supernet (built by the `ofa` package with random weights, offline)
imported, and proven to compute what OFA computes, subnet by subnet, in torch and in ONNX Runtime.

The weights are random but not trivial: conv weights He-initialised, BN statistics estimated on
random images and then perturbed, BN affine parameters, SE biases and OFA's kernel-transform
matrices randomised, so that a wrong mapping of any of them changes the outputs (the negative
controls below check that it does).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("ofa", reason="the `ofa` package (extra [ofa]: pip install ofa) builds OFA's supernet to compare")

from ofa.imagenet_classification.elastic_nn.networks import OFAMobileNetV3  # noqa: E402

from hwnas import spaces  # noqa: E402
from hwnas.arch import Arch  # noqa: E402
from hwnas.errors import CheckpointError  # noqa: E402
from hwnas.ofa_import import convert_state_dict, import_ofa, ofa_key_map, ofa_subnet_settings  # noqa: E402
from hwnas.space import SearchSpace  # noqa: E402
from hwnas.supernet import Supernet  # noqa: E402

TOL = 1e-5  # fp32, torch vs torch
ONNX_TOL = 1e-4  # fp32, ONNX Runtime vs torch (another kernel library, BN folded into the convs)
MAP_TOL = 5e-5  # fp32, the last feature map: values of order one after ~50 layers
SMALL_INPUT = 96


def images(resolution: int, n: int = 2, seed: int = 0) -> torch.Tensor:
    """Images with structure at every scale (white noise alone pools to the same features for every image)."""
    generator = torch.Generator().manual_seed(seed)
    r = resolution
    coarse = torch.nn.functional.interpolate(torch.randn(n, 3, 6, 6, generator=generator), size=(r, r),
                                             mode="bilinear", align_corners=False)
    pattern = coarse + 0.5 * torch.randn(n, 3, r, r, generator=generator)
    contrast = 0.5 + 1.5 * torch.rand(n, 1, 1, 1, generator=generator)
    return contrast * pattern + torch.randn(n, 3, 1, 1, generator=generator)  # and a colour cast per image


def random_ofa(width: float, n_classes: int = 1000, seed: int = 0) -> OFAMobileNetV3:
    """OFA's supernet (d234_e346_k357) with random, non-degenerate weights, in eval mode."""
    torch.manual_seed(seed)
    net = OFAMobileNetV3(n_classes=n_classes, dropout_rate=0.0, width_mult=width, ks_list=[3, 5, 7],
                         expand_ratio_list=[3, 4, 6], depth_list=[2, 3, 4])
    for module in net.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_in")
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    net.set_max_net()
    net.train()
    for bn in bns:  # statistics of real activations, so the signal survives ~50 layers
        bn.reset_running_stats()
        bn.momentum = None
    with torch.no_grad():
        net(images(192, 4, seed=seed + 99))  # the test's kind of images, near its sizes
    generator = torch.Generator().manual_seed(seed + 1)

    def rand(t: torch.Tensor) -> torch.Tensor:
        return torch.rand(t.shape, generator=generator)

    def randn(t: torch.Tensor) -> torch.Tensor:
        return torch.randn(t.shape, generator=generator)

    with torch.no_grad():
        for bn in bns:  # perturbed, so that statistics that were not copied show
            bn.momentum = 0.1
            bn.running_mean.add_(0.1 * bn.running_var.sqrt() * randn(bn.running_mean))
            bn.running_var.mul_(0.8 + 0.45 * rand(bn.running_var))
            bn.weight.copy_(0.8 + 0.4 * rand(bn.weight))
            bn.bias.copy_(0.1 * randn(bn.bias))
        for block in net.blocks[1:]:  # residual branches start small, as in training (zero_last_gamma), or
            if block.shortcut is not None:  # the sums grow through 20 blocks
                block.conv.point_linear.bn.bn.weight.mul_(0.3)
        for name, tensor in net.state_dict().items():
            if name.endswith("_matrix"):  # OFA's kernel transforms: identity at init, learned in training; here
                large, small = (int(k) for k in name.rsplit(".", 1)[1].removesuffix("_matrix").split("to"))
                tensor.add_(0.15 * randn(tensor)).mul_(large / small)  # they keep the kernel's gain
            elif ".se." in name and name.endswith("bias"):
                tensor.copy_(0.2 * randn(tensor))
        classifier = net.classifier.linear
        classifier.weight.copy_(randn(classifier.weight) / classifier.in_features ** 0.5)
        classifier.bias.copy_(0.1 * randn(classifier.bias))
    return net.eval()


def ofa_output(net: OFAMobileNetV3, space: SearchSpace, arch: Arch, x: torch.Tensor) -> torch.Tensor:
    return ofa_outputs(net, space, arch, x)[0]


def _capture(module: nn.Module, net: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`net(x)` and what `module` (inside `net`) returned on the way."""
    captured: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        with torch.no_grad():
            return net(x), captured[0]
    finally:
        handle.remove()


def ofa_outputs(net: OFAMobileNetV3, space: SearchSpace, arch: Arch,
                x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """OFA's logits and its last feature map (before pooling) for the active subnet `arch`.

    The feature map is compared too: random weights pool to nearly the same features for any image,
    so the logits alone vary little with the input; the map before pooling varies a lot.
    """
    net.set_active_subnet(**ofa_subnet_settings(space, arch))
    return _capture(net.final_expand_layer, net, x)


def hwnas_outputs(supernet: Supernet, arch: Arch, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    subnet = supernet.extract(arch).eval()
    return _capture(subnet[-1].final_expand, subnet, x)


def uniform(space: SearchSpace, resolution: int, depth: int, kernel: int, expand: float) -> Arch:
    n = depth * space.num_stages
    return Arch(space.name, resolution, (depth,) * space.num_stages, (kernel,) * n, (expand,) * n)


def subnets_to_compare(space: SearchSpace) -> list[tuple[Arch, int]]:
    """24 subnets and the input size each is run at: the smallest, the largest and a random subnet of every
    resolution at their own resolution; uniform and random choices at a small input, to keep the test fast
    (the network is the same at any input size)."""
    rng = np.random.default_rng(7)
    archs = [(space.smallest(), space.smallest().resolution), (space.largest(), space.largest().resolution)]
    for r in space.resolution_choices:
        sampled = space.sample(rng)
        archs.append((Arch(sampled.space, r, sampled.depths, sampled.kernels, sampled.expands), r))
        for k, e in ((3, 3), (7, 6), (5, 4)):
            archs.append((uniform(space, r, int(rng.choice(space.depth_choices)), k, e), SMALL_INPUT))
    archs += [(space.sample(rng), SMALL_INPUT) for _ in range(2)]
    return archs


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """One torch thread: these small batches gain nothing from two, and on a shared 2-core machine two threads
    spin against each other (ten times slower under load)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class Imported:
    def __init__(self, width: float, n_classes: int, folder: Path) -> None:
        self.ofa = random_ofa(width, n_classes)
        self.path = folder / f"ofa_mbv3_d234_e346_k357_w{width}"
        torch.save(self.ofa.state_dict(), self.path)
        self.out = folder / f"w{width}" / "supernet.pt"
        self.result = import_ofa(self.path, self.out)
        from hwnas.checkpoint import load_supernet

        self.supernet, _ = load_supernet(self.out)  # what search and export read
        self.space = self.supernet.space


@pytest.fixture(scope="module")
def w10(tmp_path_factory: pytest.TempPathFactory) -> Imported:
    return Imported(1.0, 1000, tmp_path_factory.mktemp("ofa_w10"))


@pytest.fixture(scope="module")
def w12(tmp_path_factory: pytest.TempPathFactory) -> Imported:
    return Imported(1.2, 1000, tmp_path_factory.mktemp("ofa_w12"))


def _inputs(arch: Arch, n: int = 2, seed: int = 0) -> torch.Tensor:
    return images(arch.resolution, n, seed)


def test_import_records_space_and_provenance(w10: Imported, w12: Imported) -> None:
    assert w10.space.name == "mbv3-224" and w12.space.name == "mbv3-224-w1.2"
    assert w10.space.to_dict() == spaces.get("mbv3-224").to_dict()
    assert w12.space.to_dict() == spaces.get("mbv3-224-w1.2").to_dict()
    state = torch.load(w10.out, map_location="cpu", weights_only=True)
    source = state["imported_from"]
    assert source["kind"] == "once-for-all" and source["width"] == "1.0" and source["file"] == w10.path.name
    assert source["bytes"] == w10.path.stat().st_size and len(source["sha256"]) == 64
    assert state["supernet_config"] == {"kernel_transform": True}
    # every OFA tensor has exactly one place in hwnas's supernet
    key_map = ofa_key_map(w10.space)
    assert set(key_map) == set(w10.ofa.state_dict())
    assert len(set(key_map.values())) == len(key_map)


def test_every_subnet_computes_what_ofa_computes(w10: Imported) -> None:
    archs = subnets_to_compare(w10.space)
    assert len(archs) >= 20 and {a.resolution for a, size in archs if size == a.resolution} == set(
        w10.space.resolution_choices)
    assert (w10.space.smallest(), 160) in archs and (w10.space.largest(), 224) in archs
    for n, (arch, size) in enumerate(archs):
        x = images(size, 2, seed=n)
        expected, expected_map = ofa_outputs(w10.ofa, w10.space, arch, x)
        got, got_map = hwnas_outputs(w10.supernet, arch, x)
        diff = float((got - expected).abs().max())
        assert diff <= TOL, f"{arch.to_json()}: logits: max abs diff {diff:.3g} > {TOL}"
        diff = float((got_map - expected_map).abs().max())
        assert diff <= MAP_TOL, f"{arch.to_json()}: last feature map: max abs diff {diff:.3g} > {MAP_TOL}"
        # not trivially equal: the features depend on the image, far above the tolerance, and are of order one
        spread = float((expected_map[0] - expected_map[1]).abs().mean())
        assert spread > 100 * TOL, f"{arch.to_json()}: the features barely depend on the image ({spread:.3g})"
        assert float(expected.abs().max()) < 100


def test_w12_subnets_compute_what_ofa_computes(w12: Imported) -> None:
    space = w12.space
    rng = np.random.default_rng(3)
    archs = [space.smallest(), space.largest(), space.sample(rng), space.sample(rng)]
    for n, arch in enumerate(archs):
        x = images(arch.resolution if n < 2 else SMALL_INPUT, 2, seed=n)
        got, got_map = hwnas_outputs(w12.supernet, arch, x)
        expected, expected_map = ofa_outputs(w12.ofa, space, arch, x)
        diff = float((got - expected).abs().max())
        assert diff <= TOL, f"{arch.to_json()}: max abs diff {diff:.3g} > {TOL}"
        assert float((got_map - expected_map).abs().max()) <= MAP_TOL


def test_the_check_fails_without_transforms_or_bn_statistics(w10: Imported) -> None:
    """Negative controls: the comparison above would notice a dropped kernel transform or BN statistics."""
    space = w10.space
    arch = uniform(space, 160, 2, 3, 4)  # 3x3 kernels: both transforms (7to5, 5to3) in play
    x = _inputs(arch)
    expected = ofa_outputs(w10.ofa, space, arch, x)[1]
    plain = Supernet(space, kernel_transform=False)
    plain.load_state_dict({k: v for k, v in w10.supernet.state_dict().items() if ".transforms." not in k})
    no_transform = hwnas_outputs(plain, arch, x)[1]
    subnet = w10.supernet.extract(arch).eval()
    subnet[2].load_state_dict({k: torch.zeros_like(v) if k.endswith("running_mean") else v
                               for k, v in subnet[2].state_dict().items()})  # one block's BN means
    no_stats = _capture(subnet[-1].final_expand, subnet, x)[1]
    assert float((hwnas_outputs(w10.supernet, arch, x)[1] - expected).abs().max()) <= MAP_TOL
    assert float((no_transform - expected).abs().max()) > 1000 * TOL
    assert float((no_stats - expected).abs().max()) > 1000 * TOL


def test_onnx_export_of_imported_subnet_matches_ofa_in_onnx_runtime(w10: Imported, tmp_path: Path) -> None:
    from exporters.onnx import export_onnx, ort_predict, ort_session

    space = w10.space
    rng = np.random.default_rng(11)
    sampled = space.sample(rng)
    # the smallest (3x3 kernels: both transforms) and a random mix of kernels and widths
    for n, arch in enumerate([space.smallest(), Arch(sampled.space, 160, sampled.depths, sampled.kernels,
                                                                  sampled.expands)]):
        x = _inputs(arch, seed=100 + n)
        expected = ofa_output(w10.ofa, space, arch, x).numpy()
        path = tmp_path / f"{arch.arch_id}.onnx"
        export_onnx(w10.supernet.extract(arch), arch, path, check_inputs=x)
        got = ort_predict(ort_session(path, threads=1), x, batch_size=2)
        diff = float(np.abs(got - expected).max())
        assert diff <= ONNX_TOL, f"{arch.to_json()}: ONNX Runtime vs OFA max abs diff {diff:.3g} > {ONNX_TOL}"


# ---- refusals ----------------------------------------------------------------------------------------------


def one_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line, got:\n{text}"
    assert "Traceback" not in text
    return lines[0]


def _bad_state(w10: Imported, kind: str) -> tuple[dict[str, torch.Tensor], str]:
    state = dict(w10.ofa.state_dict())
    key = "blocks.7.conv.depth_conv.conv.5to3_matrix"
    if kind == "missing":
        del state[key]
    elif kind == "shape":
        state[key] = torch.zeros(9, 8)
    elif kind == "extra":
        key = "blocks.21.conv.depth_conv.conv.weight"
        state[key] = torch.zeros(3)
    elif kind == "nan":
        state[key] = state[key].clone()
        state[key][0, 0] = float("nan")
    return state, key


@pytest.mark.parametrize("kind,words", [("missing", "missing key"), ("shape", "has shape (9, 8), expected (9, 9)"),
                                        ("extra", "unexpected key"), ("nan", "NaN")])
def test_a_state_dict_that_does_not_fit_is_refused_naming_the_key(w10: Imported, hwnas_cli, tmp_path: Path,
                                                                  kind: str, words: str) -> None:
    state, key = _bad_state(w10, kind)
    source, out = tmp_path / "ofa.pth", tmp_path / "out" / "supernet.pt"
    torch.save({"state_dict": state}, source)
    result = hwnas_cli("import", "ofa", "--checkpoint", str(source), "--out", str(out))
    line = one_line(result.stderr)
    assert result.returncode == 2 and f"'{key}'" in line and words in line, line
    assert not out.exists() and not out.parent.exists()


def test_library_refusal_names_the_key(w10: Imported) -> None:
    state, key = _bad_state(w10, "missing")
    with pytest.raises(CheckpointError, match=rf"missing key '{key}'"):
        convert_state_dict(state)
    with pytest.raises(Exception, match=r"--width 1.2 expects key 'first_conv.conv.weight' of shape \(24, 3, 3, 3\)"):
        convert_state_dict(w10.ofa.state_dict(), "1.2")


def test_out_that_exists_or_cannot_be_written_is_refused(w10: Imported, hwnas_cli, tmp_path: Path) -> None:
    existing = tmp_path / "supernet.pt"
    existing.write_bytes(b"keep me")
    result = hwnas_cli("import", "ofa", "--checkpoint", str(w10.path), "--out", str(existing))
    assert result.returncode == 2 and "exists" in one_line(result.stderr) and "--force" in result.stderr
    assert existing.read_bytes() == b"keep me"
    for out, words in [(existing / "sub" / "supernet.pt", "is a file, not a directory"),
                       (tmp_path, "is a directory"), (w10.path, "the OFA file itself")]:
        result = hwnas_cli("import", "ofa", "--checkpoint", str(w10.path), "--out", str(out), "--force")
        assert result.returncode == 2 and words in one_line(result.stderr), result.stderr
    assert existing.read_bytes() == b"keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["supernet.pt"]
    missing = hwnas_cli("import", "ofa", "--checkpoint", str(tmp_path / "nope.pth"), "--out", str(tmp_path / "o.pt"))
    assert missing.returncode == 2 and "no such file" in one_line(missing.stderr)
    again = hwnas_cli("import", "ofa", "--checkpoint", str(w10.out), "--out", str(tmp_path / "o.pt"))
    assert again.returncode == 2 and "already an hwnas supernet checkpoint" in one_line(again.stderr)
    assert not (tmp_path / "o.pt").exists()


def test_cli_import_prints_what_it_wrote(w10: Imported, hwnas_cli, tmp_path: Path) -> None:
    out = tmp_path / "runs" / "ofa" / "supernet.pt"
    result = hwnas_cli("import", "ofa", "--checkpoint", str(w10.path), "--out", str(out), "--width", "1.0")
    assert result.returncode == 0, result.stderr
    assert "space mbv3-224" in result.stdout and out.is_file()
    state = torch.load(out, map_location="cpu", weights_only=True)
    assert json.loads(json.dumps(state["imported_from"]))["sha256"] == w10.result.source["sha256"]


# ---- end to end: import -> search on the committed mbv3-224 CPU table -> export ----------------------------

CPU_TABLE = (Path(__file__).resolve().parents[1] / "latency_tables" / "mbv3-224"
             / "cpu-amd-epyc-f25m1-1t__cpu-onnxruntime.csv")


def tiny_imagenet(root: Path, classes: int = 1000) -> Path:
    """ImageNet's layout in miniature: DIR/train/<class>/ (one image per class, for all 1000 classes the supernet's
    classifier has) and DIR/val/ (a few classes), the held-out split search never sees. Eight distinct noise images
    of ImageNet's size, linked into the class folders: the checks of export feed noise of that grain."""
    from PIL import Image

    rng = np.random.default_rng(0)
    pool = root / "pool"
    pool.mkdir(parents=True)
    sources = []
    for i in range(8):
        sources.append(pool / f"{i}.png")
        Image.fromarray(rng.integers(0, 256, (256, 280, 3), dtype=np.uint8)).save(sources[-1], compress_level=1)
    for split, n in (("train", classes), ("val", 3)):
        for c in range(n):
            folder = root / split / f"n{c:08d}"
            folder.mkdir(parents=True)
            (folder / "0.png").symlink_to(sources[(c + (split == "val")) % len(sources)])
    return root


def test_import_search_export_on_the_committed_cpu_table(w10: Imported, hwnas_cli, tmp_path: Path) -> None:
    from hwnas.latency.device import fingerprint
    from hwnas.latency.profiles import load_profile
    from hwnas.latency.table import LatencyTable

    table = LatencyTable.load(CPU_TABLE)
    assert table.target_differences(w10.space) == ([], [])  # the imported space is the table's, exactly
    identity, _ = table.target_differences(None, load_profile("cpu-onnxruntime"),
                                           fingerprint(load_profile("cpu-onnxruntime")))
    mismatch = ["--allow-mismatch"] if identity else []  # the table's own CPU, or another one (CI)
    low, high = table.latency_range(w10.space)
    budget = round(low + 0.3 * (high - low), 2)

    supernet = tmp_path / "runs" / "ofa" / "supernet.pt"
    result = hwnas_cli("import", "ofa", "--checkpoint", str(w10.path), "--out", str(supernet))
    assert result.returncode == 0, result.stderr
    data = f"imagefolder:{tiny_imagenet(tmp_path / 'imagenet')}?crop=0.875"
    run = tmp_path / "results" / "ofa"
    result = hwnas_cli("search", "--supernet", str(supernet), "--table", str(CPU_TABLE), "--budget-ms", str(budget),
                       "--data", data, "--val-size", "4", "--val-batches", "1", "--batch-size", "4",
                       "--bn-batches", "1", "--bn-batch-size", "8", "--queries", "4", "--population", "2",
                       "--device", "cpu", "--quiet", "--out", str(run), *mismatch)
    assert result.returncode == 0, result.stderr
    best = json.loads((run / "best.json").read_text())
    arch = Arch.from_dict(best["arch"])
    assert arch.space == "mbv3-224" and table.predict(arch) <= budget
    result = hwnas_cli("export", "--supernet", str(supernet), "--arch", str(run / "best.json"), "--data", data,
                       "--out", str(tmp_path / "exports"), *mismatch)
    assert result.returncode == 0, result.stderr
    from exporters.onnx import read_arch

    onnx_files = list((tmp_path / "exports").rglob("*.onnx"))
    assert len(onnx_files) == 1 and read_arch(onnx_files[0]) == arch
    deploy = json.loads(next((tmp_path / "exports").rglob("deploy.json")).read_text())
    assert deploy["arch_id"] == arch.arch_id and deploy["ort_max_abs_diff"] <= ONNX_TOL
    assert deploy["predicted_ms"] <= deploy["budget_ms"] == budget
    assert deploy["test_accuracy_torch"] is not None and deploy["test_accuracy_ort"] is not None
