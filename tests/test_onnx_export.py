"""ONNX export of subnets: checker, ONNX Runtime parity with torch, metadata, dynamic batch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument
from torch import nn

from exporters.onnx import (
    export_module,
    export_onnx,
    ort_parity,
    ort_predict,
    ort_session,
    read_arch,
    read_metadata,
)
from hwnas import spaces
from hwnas.blocks import Head, build_block, build_network
from hwnas.errors import ExportError
from hwnas.space import Arch

SPACE = spaces.get("mbv3-32")
SEEDS = range(20)


def trained_looking(arch: Arch, seed: int) -> nn.Sequential:
    """A subnet with random weights whose BatchNorm statistics are far from their initial 0/1 and whose
    logits are O(1..10), so that exporting BN in training mode, or a lost layer, shows up in parity."""
    torch.manual_seed(seed)
    net = build_network(SPACE.blocks(arch)).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in net.modules():
            if isinstance(layer, nn.BatchNorm2d):
                assert layer.running_mean is not None and layer.running_var is not None
                n = layer.num_features
                layer.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
                layer.running_var.copy_(torch.rand(n, generator=gen) * 0.5 + 0.1)
                layer.weight.copy_(torch.rand(n, generator=gen) * 0.5 + 0.75)
                layer.bias.copy_(torch.randn(n, generator=gen) * 0.1)
        head = net[-1]
        assert isinstance(head, Head)
        head.classifier.weight.mul_(100.0)
    return net


def images(n: int, arch: Arch, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, *SPACE.input_shape(arch), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Arch, nn.Module, Path]:
    arch = SPACE.sample(100)
    net = trained_looking(arch, 100)
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    export_onnx(net, arch, path, metadata={"budget_ms": "2.5", "predicted_ms": "2.1"})
    return arch, net, path


@pytest.mark.parametrize("seed", SEEDS)
def test_random_subnets_pass_the_checker_and_match_torch_in_onnx_runtime(seed: int, tmp_path: Path) -> None:
    arch = SPACE.sample(seed)
    net = trained_looking(arch, seed)
    x = images(4, arch, seed)
    with torch.no_grad():
        logits = net(x)
    assert logits.std() > 1.0, "logits too small for an absolute tolerance to mean anything"

    result = export_onnx(net, arch, tmp_path / "subnet.onnx", check_inputs=x)

    assert result.path.is_file()
    onnx.checker.check_model(onnx.load(str(result.path)), full_check=True)
    assert result.max_abs_diff <= 1e-4
    assert ort_parity(net, result.path, x) <= 1e-4
    assert read_arch(result.path) == arch


def test_parity_compares_the_eval_function_and_detects_a_changed_module(tmp_path: Path) -> None:
    """Parity has teeth: once the BN statistics move, torch and the exported file disagree."""
    arch = SPACE.sample(7)
    net = trained_looking(arch, 7)
    export_onnx(net, arch, tmp_path / "ok.onnx")
    training = trained_looking(arch, 7).train()
    assert ort_parity(training, tmp_path / "ok.onnx", images(4, arch)) == pytest.approx(0.0, abs=1e-4), (
        "ort_parity compares against the eval-mode function, whatever mode the caller's module is in")
    # Moving the BN statistics after export changes torch's function but not the file's.
    with torch.no_grad():
        for layer in net.modules():
            if isinstance(layer, nn.BatchNorm2d):
                assert layer.running_mean is not None
                layer.running_mean.add_(0.5)
    assert ort_parity(net, tmp_path / "ok.onnx", images(4, arch)) > 1e-2


def test_metadata_round_trips_the_arch_and_the_callers_values(exported: tuple[Arch, nn.Module, Path]) -> None:
    arch, _, path = exported
    meta = read_metadata(path)
    assert read_arch(path) == arch
    assert Arch.from_json(meta["hwnas.arch"]) == arch
    assert meta["hwnas.space"] == "mbv3-32"
    assert meta["hwnas.arch_id"] == arch.arch_id
    assert meta["hwnas.budget_ms"] == "2.5"
    assert meta["hwnas.predicted_ms"] == "2.1"
    assert float(meta["hwnas.ort_max_abs_diff"]) <= 1e-4
    # The same values through ONNX Runtime, as a deployment would read them.
    assert ort_session(path).get_modelmeta().custom_metadata_map["hwnas.arch_id"] == arch.arch_id


def test_caller_cannot_overwrite_the_arch_metadata(tmp_path: Path) -> None:
    arch = SPACE.smallest()
    with pytest.raises(ValueError, match="reserved"):
        export_onnx(trained_looking(arch, 0), arch, tmp_path / "m.onnx", metadata={"arch_id": "x"})


def test_dynamic_batch_runs_at_batch_1_and_7(exported: tuple[Arch, nn.Module, Path]) -> None:
    arch, net, path = exported
    model = onnx.load(str(path))
    assert [i.name for i in model.graph.input] == ["input"]
    assert [o.name for o in model.graph.output] == ["logits"]
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param
    session = ort_session(path, threads=1)
    for n in (1, 7):
        x = images(n, arch, seed=n)
        out = session.run(["logits"], {"input": x.numpy()})[0]
        with torch.no_grad():
            expected = net(x).numpy()
        assert out.shape == (n, SPACE.num_classes)
        np.testing.assert_allclose(out, expected, rtol=0, atol=1e-4)


def test_ort_predict_batches_match_one_big_batch(exported: tuple[Arch, nn.Module, Path]) -> None:
    arch, net, path = exported
    x = images(11, arch, seed=3)
    logits = ort_predict(ort_session(path, threads=1), x, batch_size=4)
    with torch.no_grad():
        expected = net(x).numpy()
    assert logits.shape == (11, SPACE.num_classes)
    np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-4)


def test_fixed_batch_export_rejects_other_batches_but_predicts_by_padding(tmp_path: Path) -> None:
    arch = SPACE.smallest()
    net = trained_looking(arch, 1)
    result = export_onnx(net, arch, tmp_path / "fixed.onnx", batch_size=4, dynamic_batch=False)
    session = ort_session(result.path, threads=1)
    assert session.get_inputs()[0].shape[0] == 4
    with pytest.raises(InvalidArgument, match="(?i)dimension"):
        session.run(None, {"input": images(3, arch).numpy()})
    x = images(6, arch, seed=5)
    with torch.no_grad():
        expected = net(x).numpy()
    np.testing.assert_allclose(ort_predict(session, x, batch_size=1), expected, rtol=0, atol=1e-4)


def test_export_module_on_a_single_block_leaves_the_module_as_it_was(tmp_path: Path) -> None:
    spec = SPACE.all_blocks()[5]
    block = build_block(spec).train()
    path = export_module(block, tmp_path / "block.onnx", (spec.cin, spec.in_size, spec.in_size), batch_size=2,
                         dynamic_batch=False)
    assert block.training, "the caller's module must keep its mode"
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert not any(n.op_type == "BatchNormalization" for n in model.graph.node), "BN should fold into conv"
    x = torch.randn(2, spec.cin, spec.in_size, spec.in_size)
    out = ort_session(path, threads=1).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        expected = block.eval()(x).numpy()
    assert out.shape == (2, spec.cout, spec.out_size, spec.out_size)
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-4)


def test_read_arch_refuses_a_file_without_hwnas_metadata(tmp_path: Path) -> None:
    path = export_module(nn.Conv2d(1, 2, 3), tmp_path / "plain.onnx", (1, 8, 8))
    assert read_metadata(path) == {}
    with pytest.raises(ExportError, match="plain.onnx") as info:
        read_arch(path)
    assert "hwnas.arch" in str(info.value)
    assert "\n" not in str(info.value)


def test_unreadable_files_are_export_errors_naming_the_file(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="missing.onnx"):
        read_arch(tmp_path / "missing.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00not an onnx model\xff" * 10)
    with pytest.raises(ExportError, match="junk.onnx"):
        read_metadata(junk)


def test_failed_parity_leaves_no_file(tmp_path: Path) -> None:
    arch = SPACE.smallest()
    net = trained_looking(arch, 2)
    path = tmp_path / "strict.onnx"
    with pytest.raises(ExportError, match="atol"):
        export_onnx(net, arch, path, atol=0.0, check_inputs=images(4, arch))
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []


def test_onnxslim_simplifies_only_with_parity_and_says_so(tmp_path: Path) -> None:
    arch = SPACE.sample(7)
    net = trained_looking(arch, 7)
    plain = export_onnx(net, arch, tmp_path / "plain.onnx", simplify=False)
    slim = export_onnx(net, arch, tmp_path / "slim.onnx")
    assert "hwnas.simplified" not in plain.metadata
    note = read_metadata(slim.path)["hwnas.simplified"]
    assert note.startswith("onnxslim "), note
    before, after = (int(n) for n in note.split(": ")[1].split(" nodes")[0].split(" -> "))
    assert before == len(onnx.load(str(plain.path)).graph.node) and after == len(onnx.load(str(slim.path)).graph.node)
    assert after <= before and slim.max_abs_diff <= 1e-4
    x = images(3, arch, seed=5)
    np.testing.assert_allclose(ort_predict(ort_session(slim.path), x, 3), ort_predict(ort_session(plain.path), x, 3),
                               atol=1e-4)
