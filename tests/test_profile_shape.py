"""`hwnas profile` for a dataset's shape, a complete table left untouched, the table's lock, and what the metadata
records of the profile (issue 19)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from hwnas import spaces
from hwnas.checkpoint import save_checkpoint
from hwnas.errors import LatencyTableError
from hwnas.latency.calibration import identity_calibration
from hwnas.latency.profiler import calibration_path, profile_space, profile_table, shape_suffix, table_path
from hwnas.latency.profiles import load_profile
from hwnas.latency.table import LatencyTable, meta_path_for
from hwnas.latency.table_files import lock_path_for, table_lock
from hwnas.space import SearchSpace, StageSpec

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "hwnas" / "checkpoints" / "mbv3-32_fashion-mnist.pt"
COMMITTED = ROOT / "latency_tables" / "mbv3-32" / "cpu-amd-epyc-f25m1-1t__cpu-onnxruntime.csv"
PROFILE_TOML = """\
name = "test-cpu"
backend = "torch-cpu"
precision = "fp32"
batch_size = 1
threads = 1
warmup = 1
repeats = 5
description = "fast settings for tests: numbers are noisy"
"""
FAST: dict[str, Any] = {"rounds": 1, "max_rounds": 1, "progress": False}


def tiny_space(in_channels: int = 1, num_classes: int = 10, name: str = "tiny-shape") -> SearchSpace:
    """One stage, 8-12 px: about twenty blocks, profiled in a second."""
    return SearchSpace(
        name=name, in_channels=in_channels, num_classes=num_classes, stem_channels=8, stem_stride=2,
        stem_act="hswish", first_channels=8, stages=(StageSpec(16, stride=2, act="relu"),),
        final_expand_channels=24, feature_channels=32, head_act="hswish",
        kernel_choices=(3, 5), expand_choices=(2, 4), depth_choices=(1, 2), resolution_choices=(8, 12),
    )


spaces.register("tiny-shape", tiny_space)  # a preset whose default shape is 1 channel, 10 classes
spaces.register("tiny-fixed", lambda **_: tiny_space(name="tiny-fixed"))  # a factory that ignores the shape


@pytest.fixture()
def profile_file(tmp_path: Path) -> Path:
    path = tmp_path / "profiles" / "test-cpu.toml"
    path.parent.mkdir()
    path.write_text(PROFILE_TOML)
    return path


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under `folder`: its bytes and its mtime in nanoseconds."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))
            if p.is_file()}


# ---- 1. the shape in the file name --------------------------------------------------------------------------------
def test_the_shape_is_in_the_name_only_where_it_is_not_the_presets_default() -> None:
    profile = load_profile("cpu-onnxruntime")
    default = table_path("latency_tables", spaces.get("mbv3-32"), profile, "dev")
    assert default == Path("latency_tables/mbv3-32/dev__cpu-onnxruntime.csv")  # as it always was
    rgb = table_path("latency_tables", spaces.get("mbv3-32", in_channels=3, num_classes=4), profile, "dev")
    assert rgb == Path("latency_tables/mbv3-32/dev__cpu-onnxruntime__in3-cls4.csv")
    assert shape_suffix(spaces.get("mbv3-32", num_classes=4)) == "__in1-cls4"
    assert shape_suffix(spaces.get("mbv3-224")) == ""  # its default is 3 channels, 1000 classes
    assert shape_suffix(spaces.get("mbv3-224", in_channels=1)) == "__in1-cls1000"
    assert shape_suffix(tiny_space(3, 4, name="not-registered")) == ""  # no preset: no default to differ from
    # the committed tables are still where table_path looks for them
    table = LatencyTable.load(COMMITTED)
    assert table_path(ROOT / "latency_tables", spaces.get("mbv3-32"), profile, table.device_slug) == COMMITTED


def test_a_shaped_table_is_written_beside_the_default_one_by_the_api_and_the_cli(tmp_path, profile_file,
                                                                                  hwnas_cli) -> None:
    out = tmp_path / "tables"
    default = profile_space(spaces.get("tiny-shape"), profile_file, out, calibration_subnets=0, **FAST)
    shaped = profile_space(spaces.get("tiny-shape", in_channels=3, num_classes=4), profile_file, out,
                           calibration_subnets=2, **FAST)
    assert shaped.name == default.name.removesuffix(".csv") + "__in3-cls4.csv"
    assert calibration_path(shaped).is_file() and meta_path_for(shaped).is_file()
    assert LatencyTable.load(default).space.in_channels == 1
    table = LatencyTable.load(shaped)
    assert (table.space.in_channels, table.space.num_classes) == (3, 4)
    assert table.missing_keys(spaces.get("tiny-shape", in_channels=3, num_classes=4)) == []

    # the CLI builds the same name; here an RGB 2-class table, its keys those of that space's stem and head
    result = hwnas_cli("profile", "--profile", str(profile_file), "--space", "tiny-shape", "--in-channels", "3",
                       "--num-classes", "2", "--out", str(out), "--calibration-subnets", "0", "--rounds", "1",
                       "--quiet", "--allow-busy", "--max-wait", "0")
    assert result.returncode == 0, result.stderr
    cli_path = default.with_name(default.name.removesuffix(".csv") + "__in3-cls2.csv")
    assert f"wrote {cli_path}" in result.stdout and "3-channel input, 2 classes" in result.stdout
    assert LatencyTable.load(cli_path).missing_keys(spaces.get("tiny-shape", in_channels=3, num_classes=2)) == []
    assert not list(out.rglob("*.lock"))  # removed on a normal exit


def test_like_takes_the_space_and_its_shape_from_a_checkpoint(tmp_path, profile_file, hwnas_cli) -> None:
    checkpoint = tmp_path / "supernet.pt"
    save_checkpoint(checkpoint, {"format": "hwnas-supernet", "version": 1, "space": tiny_space(3, 5).to_dict(),
                                 "supernet_config": {}, "model": {}, "train_config": {}, "epoch": 0})
    out = tmp_path / "tables"
    result = hwnas_cli("profile", "--profile", str(profile_file), "--like", str(checkpoint), "--out", str(out),
                       "--calibration-subnets", "0", "--rounds", "1", "--quiet", "--allow-busy", "--max-wait", "0")
    assert result.returncode == 0, result.stderr
    (path,) = (out / "tiny-shape").glob("*.csv")
    assert path.name.endswith("__test-cpu__in3-cls5.csv")
    assert LatencyTable.load(path).target_differences(tiny_space(3, 5)) == ([], [])  # the supernet's space exactly


@pytest.mark.parametrize(("args", "message"), [
    (["--space", "mbv3-32", "--in-channels", "0"], r"--in-channels must be an integer >= 1, got 0"),
    (["--space", "mbv3-32", "--num-classes", "-3"], r"--num-classes must be an integer >= 1, got -3"),
    (["--like", str(SHIPPED), "--in-channels", "3"], r"--in-channels 3 conflicts with --like .*in_channels 1"),
    (["--like", str(SHIPPED), "--space", "mbv3-224"], r"supernet's space is 'mbv3-32', not --space 'mbv3-224'"),
    (["--like", "no-such.pt"], r"no-such.pt: no such checkpoint file"),
    (["--in-channels", "3"], r"--space is required \(or --like SUPERNET.pt"),
    (["--space", "tiny-fixed", "--in-channels", "3"], r"space 'tiny-fixed' ignores in_channels"),
])
def test_a_bad_shape_is_one_line_and_writes_nothing(tmp_path, hwnas_cli, args: list[str], message: str) -> None:
    out = tmp_path / "tables"
    result = hwnas_cli("profile", "--profile", "cpu-onnxruntime", *args, "--out", str(out))
    assert result.returncode == 2
    err = result.stderr.strip()
    assert err.startswith("hwnas profile: error: ") and "\n" not in err
    assert re.search(message, err), err
    assert not out.exists()


def test_the_api_refuses_a_space_of_no_channels_before_writing(tmp_path, profile_file) -> None:
    from hwnas.errors import HwnasError

    with pytest.raises(HwnasError, match=r"space 'tiny-shape': in_channels and num_classes must be >= 1, got 0 and 4"):
        profile_space(spaces.get("tiny-shape", in_channels=0, num_classes=4), profile_file, tmp_path / "t", **FAST)
    assert not (tmp_path / "t").exists()


def test_like_with_an_agreeing_option_is_the_checkpoints_space() -> None:
    from hwnas.commands.profile import space_of

    space = space_of(None, 1, None, SHIPPED)
    assert space.to_dict() == spaces.get("mbv3-32").to_dict()


# ---- 2. a complete table is never rewritten; resume only into the same shape ----------------------------------------
def test_a_complete_table_is_left_byte_for_byte_and_mtime_as_it_was(tmp_path, profile_file) -> None:
    space = spaces.get("tiny-shape", in_channels=3, num_classes=4)
    out = tmp_path / "tables"
    path = profile_space(space, profile_file, out, calibration_subnets=3, **FAST)
    before = snapshot(out)
    measured: list[str] = []
    for subnets in (3, 2, 0):  # the same subnets, a prefix of them (same seed), none: all present already
        run = profile_table(space, profile_file, out, calibration_subnets=subnets,
                            on_row=lambda spec, timing: measured.append(spec.key), **FAST)
        assert run.complete_before and run.path == path
        assert (run.blocks_measured, run.subnets_measured, run.subnets) == (0, 0, 3)
        assert snapshot(out) == before
    assert measured == []
    # one more subnet asked for: only it is measured, and then the files change
    run = profile_table(space, profile_file, out, calibration_subnets=4, **FAST)
    assert not run.complete_before and (run.blocks_measured, run.subnets_measured) == (0, 1)
    assert LatencyTable.load(path).calibration["n_subnets"] == 4


def test_a_table_killed_before_its_calibration_was_fitted_is_finished_not_called_complete(tmp_path,
                                                                                         profile_file) -> None:
    space = spaces.get("tiny-shape")
    path = profile_space(space, profile_file, tmp_path, calibration_subnets=3, **FAST)
    meta_path = meta_path_for(path)
    meta = json.loads(meta_path.read_text())
    meta["calibration"] = identity_calibration()  # as a kill after the last subnet, before the final save, leaves it
    meta_path.write_text(json.dumps(meta))
    run = profile_table(space, profile_file, tmp_path, calibration_subnets=3, **FAST)
    assert not run.complete_before and (run.blocks_measured, run.subnets_measured) == (0, 0)
    assert LatencyTable.load(path).calibration["n_subnets"] == 3  # fitted on the subnets already on disk


def test_the_committed_table_resumed_here_measures_and_writes_nothing(tmp_path, hwnas_cli) -> None:
    """The committed mbv3-32 table, its fingerprint made this machine's (as on the machine that profiled it)."""
    pytest.importorskip("exporters.onnx", reason="the onnxruntime-cpu backend exports through exporters.onnx")
    from hwnas.latency.device import device_slug, fingerprint

    profile = load_profile("cpu-onnxruntime")
    here = fingerprint(profile)
    target = table_path(tmp_path, spaces.get("mbv3-32"), profile, device_slug(here))
    target.parent.mkdir(parents=True)
    for source in (COMMITTED, meta_path_for(COMMITTED), calibration_path(COMMITTED)):
        shutil.copy(source, target.with_name(source.name.replace("cpu-amd-epyc-f25m1-1t", device_slug(here))))
    meta = json.loads(meta_path_for(target).read_text())
    meta["fingerprint"] = here
    meta_path_for(target).write_text(json.dumps(meta))
    before = snapshot(tmp_path)
    result = hwnas_cli("profile", "--profile", "cpu-onnxruntime", "--space", "mbv3-32", "--out", str(tmp_path),
                       "--quiet", "--allow-busy", "--max-wait", "0")
    assert result.returncode == 0, result.stderr
    assert "is complete (169 blocks, 30 calibration subnets): nothing measured, nothing written" in result.stdout
    assert "wrote" not in result.stdout
    assert snapshot(tmp_path) == before


def test_resume_into_a_table_of_another_shape_is_refused_with_the_command_that_builds_the_right_one(
        tmp_path, profile_file) -> None:
    # not registered: no preset default, so both shapes take one file name, and the identity check must catch it
    path = profile_space(tiny_space(3, 4, name="tiny-loose"), profile_file, tmp_path, calibration_subnets=0, **FAST)
    before = snapshot(tmp_path)
    with pytest.raises(LatencyTableError, match=r"cannot resume.*another shape \(space in_channels 3 != 1\).*`hwnas "
                                                r"profile --profile test-cpu --space tiny-loose --in-channels 1 "
                                                r"--num-classes 4 --out OTHER_DIR`.*--no-resume") as caught:
        profile_space(tiny_space(1, 4, name="tiny-loose"), profile_file, tmp_path, calibration_subnets=0, **FAST)
    assert "\n" not in str(caught.value)
    assert snapshot(tmp_path) == before and not lock_path_for(path).exists()


def test_check_target_advises_profiling_the_shape_not_allow_mismatch() -> None:
    """What `hwnas search` says of a table of another shape (run_search calls check_target with its space)."""
    table = LatencyTable.load(COMMITTED)
    rgb = spaces.get("mbv3-32", in_channels=3, num_classes=4)
    with pytest.raises(LatencyTableError) as caught:
        table.check_target(rgb)
    message = str(caught.value)
    assert ("`hwnas profile --profile cpu-onnxruntime --space mbv3-32 --in-channels 3 --num-classes 4`" in message
            and "--like SUPERNET.pt" in message)
    assert "allow_mismatch" not in message and "allow-mismatch" not in message  # it would find no stem or head key
    with pytest.raises(LatencyTableError, match="allow_mismatch=True"):  # another space still gets that advice
        table.check_target(spaces.get("mbv3-224"))


# ---- 3. the lock -----------------------------------------------------------------------------------------------------
HOLDER = textwrap.dedent("""
    import sys
    from hwnas.latency.table_files import table_lock
    with table_lock(sys.argv[1]):
        print("locked", flush=True)
        sys.stdin.read()  # held until the test closes our stdin (or kills us)
""")


def hold(path: Path) -> subprocess.Popen:
    """Another process holding the lock of the table at `path`, once this returns."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, cwd=ROOT)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_profile_of_a_locked_table_is_refused_and_a_killed_holder_blocks_nothing(
        tmp_path, profile_file, hwnas_cli) -> None:
    out = tmp_path / "tables"
    space = spaces.get("tiny-shape", in_channels=3, num_classes=4)
    path = table_path(out, space, load_profile(profile_file), _slug(profile_file))
    proc = hold(path)
    try:
        result = hwnas_cli("profile", "--profile", str(profile_file), "--space", "tiny-shape", "--in-channels", "3",
                           "--num-classes", "4", "--out", str(out), "--calibration-subnets", "0", "--rounds", "1",
                           "--quiet", "--allow-busy", "--max-wait", "0")
        assert result.returncode == 2
        err = result.stderr.strip()
        assert "\n" not in err and path.name in err and f"pid {proc.pid}" in err and "--wait-lock" in err
        assert not path.exists()  # nothing written
    finally:
        proc.kill()
        proc.wait()
    assert lock_path_for(path).exists()  # the killed holder's file is left, but no one holds it
    profile_space(space, profile_file, out, calibration_subnets=0, **FAST)
    assert path.is_file() and not lock_path_for(path).exists()


def test_wait_lock_waits_for_the_holder_then_holds_the_lock_itself(tmp_path) -> None:
    path = tmp_path / "t.csv"
    proc = hold(path)
    told: list[str] = []

    def release(holder: str) -> None:  # called once we found the lock held, just before waiting for it
        told.append(holder)
        assert proc.stdin is not None
        proc.stdin.close()

    try:
        with table_lock(path, wait=True, on_wait=release) as lock:
            assert proc.wait(timeout=60) == 0  # the holder finished while we waited
            assert lock.read_text().strip() == str(os.getpid())  # we hold the file at the path now
            with pytest.raises(LatencyTableError, match=rf"pid {os.getpid()}"):
                with table_lock(path):  # and refuse anyone else (flock is per open file, so even ourselves)
                    pass
    finally:
        proc.kill()
        proc.wait()
    assert told == [f"pid {proc.pid}"]
    assert not lock.exists()


def _slug(profile_file: Path) -> str:
    from hwnas.latency.device import device_slug, fingerprint

    return device_slug(fingerprint(load_profile(profile_file)))


# ---- 4. the profile as the metadata records it -----------------------------------------------------------------------
def test_the_metadata_records_the_profile_by_name_and_digest_never_by_an_absolute_path(tmp_path,
                                                                                      profile_file) -> None:
    from hwnas.fileio import file_sha256

    out = tmp_path / "tables"
    path = profile_space(spaces.get("tiny-shape"), profile_file, out, calibration_subnets=0, **FAST)
    text = meta_path_for(path).read_text()
    assert str(tmp_path) not in text
    recorded = json.loads(text)["profile"]
    assert recorded["name"] == "test-cpu" and recorded["toml_sha256"] == file_sha256(profile_file)
    assert recorded["file"] == "../../profiles/test-cpu.toml" and recorded["file_relative_to"] == "table"
    assert (path.parent / recorded["file"]).resolve() == profile_file.resolve()
    assert LatencyTable.load(path).profile == load_profile(profile_file)

    in_repo = load_profile("cpu-onnxruntime").to_record(out)
    assert in_repo["file"] == "profiles/cpu-onnxruntime.toml" and in_repo["file_relative_to"] == "repository"
    assert in_repo["digest"] == "35f333864a231dbe"  # the settings' digest is what the committed tables hold
    elsewhere = load_profile(profile_file).to_record(ROOT / "latency_tables" / "mbv3-32")
    assert (elsewhere["file"], elsewhere["file_relative_to"]) == ("test-cpu.toml", "name only")


def test_committed_tables_with_older_profile_records_still_load() -> None:
    for meta in sorted((ROOT / "latency_tables").glob("*/*.meta.json")):
        table = LatencyTable.load(meta)
        assert table.profile is not None and table.profile.name == table.profile_dict["name"]
