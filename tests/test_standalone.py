"""Stand-alone training: killed mid-epoch and continued, it ends where an uninterrupted run ends."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hwnas import spaces
from hwnas.data import load_dataset
from hwnas.recipe import TrainConfig, TrainingError
from hwnas.standalone import saved_progress, train_standalone
from tests.test_data import write_fashion_dir

CONFIG = TrainConfig(epochs=3, batch_size=8, steps_per_epoch=2, warmup_epochs=0.5, num_sampled=0, device="cpu")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("fm")
    write_fashion_dir(root, gz=True, n_train=40, n_test=10)
    return load_dataset(f"fashion-mnist:{root}", val_size=8, seed=0)


@pytest.fixture(scope="module")
def space():
    return spaces.get("mbv3-32")


def _kill_at_step(monkeypatch: pytest.MonkeyPatch, step: int) -> None:
    """Raise KeyboardInterrupt (as a kill would end the run) when training reaches `step`."""
    import hwnas.standalone as module

    real, calls = module.ResolutionCache, [0]

    def counting(*args, **kwargs):
        calls[0] += 1
        if calls[0] == step + 1:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "ResolutionCache", counting)


def test_killed_mid_epoch_and_continued_ends_bit_identical(dataset, space, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    arch = space.smallest()
    straight = train_standalone(space, arch, dataset, CONFIG)

    state = tmp_path / "run.state.pt"
    with monkeypatch.context() as patch:
        _kill_at_step(patch, 3)  # in the second epoch, after the first was saved
        with pytest.raises(KeyboardInterrupt):
            train_standalone(space, arch, dataset, CONFIG, state_path=state)
    progress = saved_progress(state)
    assert progress is not None and progress[0] == 1 and progress[1] > 0
    torch.manual_seed(12345)  # whatever the global RNG holds now, the saved state decides
    continued = train_standalone(space, arch, dataset, CONFIG, state_path=state)

    expected, got = straight.state_dict(), continued.state_dict()
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    done = saved_progress(state)
    assert done is not None and done[0] == CONFIG.epochs


def test_a_finished_state_trains_nothing_more(dataset, space, tmp_path: Path) -> None:
    import dataclasses

    state = tmp_path / "s.state.pt"
    config = dataclasses.replace(CONFIG, epochs=1)
    first = train_standalone(space, space.smallest(), dataset, config, state_path=state)
    again = train_standalone(space, space.smallest(), dataset, config, state_path=state)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), again.state_dict().values(), strict=True))


def _saved(tmp_path: Path, dataset, space) -> Path:
    import dataclasses

    state = tmp_path / "s.state.pt"
    train_standalone(space, space.smallest(), dataset, dataclasses.replace(CONFIG, epochs=1), state_path=state)
    return state


def test_a_state_of_another_arch_or_recipe_is_refused_by_name(dataset, space, tmp_path: Path) -> None:
    import dataclasses

    state = _saved(tmp_path, dataset, space)
    one_epoch = dataclasses.replace(CONFIG, epochs=1)
    with pytest.raises(TrainingError, match=r"s\.state\.pt: saved for another arch \(field 'arch'\)"):
        train_standalone(space, space.largest(), dataset, one_epoch, state_path=state)
    with pytest.raises(TrainingError, match=r"s\.state\.pt: saved with another recipe \(field 'recipe': lr differ"):
        train_standalone(space, space.smallest(), dataset, dataclasses.replace(one_epoch, lr=0.01), state_path=state)
    # where it runs is not part of the recipe
    train_standalone(space, space.smallest(), dataset, dataclasses.replace(one_epoch, device="auto"), state_path=state)


@pytest.mark.parametrize("damage, message", [
    (lambda s: b"not a torch file", "not a readable stand-alone training state"),
    (lambda s: {**s, "format": "hwnas-supernet"}, "not a stand-alone training state (field 'format')"),
    (lambda s: {**s, "epoch": "two"}, "field 'epoch' is missing or of type str"),
    (lambda s: {k: v for k, v in s.items() if k != "torch_rng"}, "field 'torch_rng' is missing or of type NoneType"),
    (lambda s: {**s, "model": {"0.0.weight": torch.zeros(1)}}, "cannot resume from field 'model'"),
])
def test_a_damaged_state_names_the_file_and_the_field(dataset, space, tmp_path: Path, damage, message: str) -> None:
    import dataclasses

    state = _saved(tmp_path, dataset, space)
    damaged = damage(torch.load(state, weights_only=True))
    if isinstance(damaged, bytes):
        state.write_bytes(damaged)
    else:
        torch.save(damaged, state)
    with pytest.raises(TrainingError) as info:
        train_standalone(space, space.smallest(), dataset, dataclasses.replace(CONFIG, epochs=1), state_path=state)
    text = str(info.value)
    assert text.startswith(f"{state}: ") and message in text and "\n" not in text
