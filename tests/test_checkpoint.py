"""Checkpoints: atomic writes, a supernet that comes back computing the same function, clear refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hwnas import spaces
from hwnas.checkpoint import FORMAT, VERSION, load_checkpoint, load_supernet, save_checkpoint
from hwnas.errors import CheckpointError
from hwnas.supernet import Supernet

SPACE = spaces.get("mbv3-32")


def checkpoint_state(net: Supernet, **extra: object) -> dict:
    state = {"format": FORMAT, "version": VERSION, "space": net.space.to_dict(),
             "supernet_config": {"kernel_transform": net.kernel_transform}, "model": net.state_dict(),
             "train_config": {"epochs": 1}, "epoch": 1, "history": [], "dataset": "fashion-mnist", "metrics": {}}
    state.update(extra)
    return state


@pytest.fixture(scope="module")
def net() -> Supernet:
    torch.manual_seed(0)
    model = Supernet(SPACE)
    with torch.no_grad():  # BN away from its init, so that a wrong load would show in the outputs
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d) and m.running_mean is not None:
                m.weight.uniform_(0.5, 1.5)
                m.running_mean.normal_(0, 0.1)
    return model.eval()


def test_saved_supernet_loads_back_computing_the_same_function(tmp_path: Path, net: Supernet) -> None:
    path = tmp_path / "run" / "supernet.pt"
    save_checkpoint(path, checkpoint_state(net))
    loaded, state = load_supernet(path, space_name="mbv3-32")
    assert state["epoch"] == 1 and loaded.space == SPACE
    arch = SPACE.sample(3)
    x = torch.randn(2, *SPACE.input_shape(arch))
    with torch.no_grad():
        assert torch.equal(loaded.set_active(arch)(x), net.set_active(arch)(x))
    assert [p.name for p in path.parent.iterdir()] == ["supernet.pt"]  # no temporary file left behind


def test_failed_save_keeps_the_previous_checkpoint_and_leaves_no_temporary(tmp_path: Path, net: Supernet) -> None:
    path = tmp_path / "supernet.pt"
    save_checkpoint(path, checkpoint_state(net, epoch=1))
    before = path.read_bytes()
    with pytest.raises(Exception):  # noqa: B017 - whatever pickle raises for a lambda
        save_checkpoint(path, checkpoint_state(net, epoch=2, metrics={"bad": lambda: 0}))
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["supernet.pt"]


def test_checkpoint_of_another_space_is_refused_by_name(tmp_path: Path, net: Supernet) -> None:
    path = tmp_path / "supernet.pt"
    save_checkpoint(path, checkpoint_state(net))
    with pytest.raises(CheckpointError, match=rf"checkpoint {path} was trained on space 'mbv3-32', not 'mbv3-224'"):
        load_supernet(path, space_name="mbv3-224")


def test_truncated_checkpoint_names_the_file(tmp_path: Path, net: Supernet) -> None:
    path = tmp_path / "supernet.pt"
    save_checkpoint(path, checkpoint_state(net))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=rf"^{path}: not a readable hwnas checkpoint"):
        load_supernet(path)


UNREADABLE = r"not a readable hwnas checkpoint \(truncated or another format: "


@pytest.mark.parametrize(("content", "message"), [
    (b"this is not a checkpoint", "not a readable hwnas checkpoint"),
    # torch's own advice (weights_only=False, safe globals, colour codes) cut down to its reason
    (b'{"format": "hwnas-supernet"}', UNREADABLE + r"not a plain-tensor torch file: Unsupported operand[^`\x1b]*\)$"),
    ({"format": object}, UNREADABLE + r"not a plain-tensor torch file: Unsupported global[^`\x1b]*\)$"),
    ({"weights": torch.zeros(2)}, "not an hwnas supernet checkpoint .field 'format' is None"),
])
def test_foreign_files_are_refused(tmp_path: Path, content: object, message: str) -> None:
    path = tmp_path / "other.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    with pytest.raises(CheckpointError, match=rf"^{path}: {message}"):
        load_checkpoint(path)


def test_missing_or_bad_fields_are_named(tmp_path: Path, net: Supernet) -> None:
    path = tmp_path / "supernet.pt"
    state = checkpoint_state(net)
    del state["space"]
    save_checkpoint(path, state)
    with pytest.raises(CheckpointError, match=rf"^{path}: checkpoint is missing field 'space'"):
        load_checkpoint(path)
    save_checkpoint(path, checkpoint_state(net, epoch="one"))
    with pytest.raises(CheckpointError, match="field 'epoch' has type str"):
        load_checkpoint(path)
    save_checkpoint(path, checkpoint_state(net, version=VERSION + 1))
    with pytest.raises(CheckpointError, match="field 'version' is 2"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        load_checkpoint(tmp_path / "missing.pt")


def test_weights_that_do_not_fit_the_stored_space_are_refused(tmp_path: Path, net: Supernet) -> None:
    path = tmp_path / "supernet.pt"
    wider = spaces.get("mbv3-32", num_classes=12)
    save_checkpoint(path, checkpoint_state(net, space=wider.to_dict()))
    with pytest.raises(CheckpointError, match="field 'model' does not fit space 'mbv3-32'"):
        load_supernet(path)


@pytest.mark.parametrize("edit, message", [
    ({"kernel_choices": [3, "x"]}, r"kernel_choices must be a non-empty list of positive numbers, got \[3, 'x'\]"),
    ({"depth_choices": []}, r"depth_choices must be a non-empty list"),
    ({"stem_stride": 0}, r"stem_stride must be a positive integer, got 0"),
    ({"stages": [{"out_channels": "24", "stride": 2}]}, r"stages\[0\]\.out_channels must be a positive integer"),
])
def test_a_damaged_space_spec_is_named_before_any_network_is_built(tmp_path: Path, net: Supernet, edit: dict,
                                                                   message: str) -> None:
    path = tmp_path / "supernet.pt"
    save_checkpoint(path, checkpoint_state(net, space={**net.space.to_dict(), **edit}))
    with pytest.raises(CheckpointError, match=rf"{path}: checkpoint field 'space' is not a valid space spec \("
                                              rf"{message}"):
        load_supernet(path)
