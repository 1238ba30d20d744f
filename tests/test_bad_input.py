"""Bad input, across every command: exit 2, one line on stderr that names the problem, no traceback, nothing
written or changed.

Each case runs the real `hwnas` main in this process, in an empty working directory (where a command's default
outputs would land), on real files made bad in the ways users make them: bad paths, bad JSON, corrupt or foreign
tables, checkpoints and profiles, impossible budgets and counts, degenerate data, and outputs that cannot be
written. After each case the working directory is still empty, and the inputs and the repository's tables and
checkpoints are byte-for-byte as before.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUPERNET = ROOT / "hwnas" / "checkpoints" / "mbv3-32_fashion-mnist.pt"
TABLE_DIR = ROOT / "latency_tables" / "mbv3-32"
TABLE = TABLE_DIR / "cpu-amd-epyc-f25m1-1t__cpu-onnxruntime.csv"
TABLE_224 = ROOT / "latency_tables" / "mbv3-224" / "cpu-amd-epyc-f25m1-1t__cpu-onnxruntime.csv"
GOOD_ARCH = {"space": "mbv3-32", "resolution": 28, "depths": [2, 2, 2, 2], "kernels": [3] * 8, "expands": [3] * 8}
WATCHED = [ROOT / "latency_tables", ROOT / "hwnas" / "checkpoints", ROOT / "profiles"]


def digest_tree(*roots: Path) -> dict[str, str]:
    """Every file under `roots` by content: what "nothing changed" compares."""
    found = {}
    for root in roots:
        for path in sorted(root.rglob("*")) if root.is_dir() else [root]:
            found[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "folder"
    return found


@dataclass(frozen=True)
class Inputs:
    """The bad (and good) files the cases point at, made once for the module."""

    root: Path

    def __getattr__(self, name: str) -> str:  # inputs.bad_json -> its path, as a CLI argument
        return str(self.root / name)


def _write_table_copy(root: Path, name: str, csv_text: str | None = None, meta_text: str | None = None) -> None:
    folder = root / name
    folder.mkdir()
    csv = folder / TABLE.name
    shutil.copy(TABLE, csv)
    meta = TABLE.with_name(TABLE.stem + ".meta.json")
    shutil.copy(meta, folder / meta.name)
    if csv_text is not None:
        csv.write_text(csv_text)
    if meta_text is not None:
        (folder / meta.name).write_text(meta_text)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Inputs:
    import torch

    root = tmp_path_factory.mktemp("bad_inputs")
    (root / "bad.json").write_text("{not json")
    (root / "empty.json").write_text("")
    (root / "list.json").write_text("[1, 2]")
    (root / "wrong_space.json").write_text(json.dumps({**GOOD_ARCH, "space": "mbv3-224"}))
    (root / "depth_float.json").write_text(json.dumps({**GOOD_ARCH, "depths": [2.9, 2, 2, 2]}))
    (root / "kernel_string.json").write_text(json.dumps({**GOOD_ARCH, "kernels": "33333333"}))
    (root / "depth_big.json").write_text(json.dumps({**GOOD_ARCH, "depths": [9, 2, 2, 2]}))
    (root / "kernel_odd.json").write_text(json.dumps({**GOOD_ARCH, "kernels": [4] * 8}))
    (root / "unknown_field.json").write_text(json.dumps({**GOOD_ARCH, "width": 2}))
    (root / "resolution_string.json").write_text(json.dumps({**GOOD_ARCH, "resolution": "28"}))
    (root / "afile").write_text("a file, not a folder")
    (root / "garbage.pt").write_bytes(b"\x00\x01 not a checkpoint" * 100)
    (root / "empty.pt").write_bytes(b"")
    blob = SUPERNET.read_bytes()
    (root / "truncated.pt").write_bytes(blob[: len(blob) // 2])
    state = torch.load(SUPERNET, map_location="cpu", weights_only=False)
    state["model"] = {k: (torch.full_like(v, float("nan")) if v.is_floating_point() else v)
                      for k, v in state["model"].items()}
    torch.save(state, root / "nan.pt")
    state = torch.load(SUPERNET, map_location="cpu", weights_only=False)
    state["space"] = {**state["space"], "num_classes": 7}
    torch.save(state, root / "wrong_shape.pt")
    (root / "syntax.toml").write_text("name = 'x'\nbackend = [unclosed\n")
    (root / "unknown_backend.toml").write_text((ROOT / "profiles" / "cpu-onnxruntime.toml").read_text()
                                               .replace('"onnxruntime-cpu"', '"abacus"'))
    (root / "zero_threads.toml").write_text((ROOT / "profiles" / "cpu-onnxruntime.toml").read_text()
                                            .replace("threads = 1", "threads = 0"))
    _write_table_copy(root, "table_no_meta")
    (root / "table_no_meta" / (TABLE.stem + ".meta.json")).unlink()
    _write_table_copy(root, "table_bad_meta", meta_text="{broken")
    _write_table_copy(root, "table_garbage", csv_text="\x00\x01garbage,\n1,2,3\n")
    rows = TABLE.read_text().splitlines()
    _write_table_copy(root, "table_missing_row", csv_text="\n".join(rows[:1] + rows[2:]) + "\n")
    _write_table_copy(root, "table_meta_list", meta_text="[]")
    for name, classes in (("one_class", ["only"]), ("empty_class", ["a", "b"])):
        for split in ("train", "val"):
            for label in classes:
                folder = root / name / split / label
                folder.mkdir(parents=True)
                if name == "empty_class" and label == "b":
                    continue
                for i in range(3):
                    _png(folder / f"{i}.png", i)
    for split, labels in (("train", ["a", "b"]), ("val", ["a", "b", "c"])):
        for label in labels:
            folder = root / "class_only_in_val" / split / label
            folder.mkdir(parents=True)
            for i in range(3):
                _png(folder / f"{i}.png", i)
    (root / "no_train").mkdir()
    return Inputs(root)


def _png(path: Path, seed: int) -> None:
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 255, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


S, T = str(SUPERNET), str(TABLE)
ARCH = json.dumps(GOOD_ARCH)
SEARCH = ["search", "--supernet", S, "--table", T, "--queries", "4", "--quiet"]
EXPORT = ["export", "--supernet", S, "--arch", ARCH, "--test-batches", "1"]
TRAIN = ["train", "--space", "mbv3-32", "--epochs", "1", "--out", "run"]
PROFILE = ["profile", "--space", "mbv3-32", "--quiet"]
VALIDATE = ["latency", "validate", "--n", "3"]

# (id, arguments with {name} standing for inputs.name, what the one line must contain)
CASES: list[tuple[str, list[str], str]] = [
    # ---- arguments argparse cannot read
    ("unknown-command", ["frobnicate"], "invalid choice: 'frobnicate'"),
    ("search-queries-not-a-number", [*SEARCH, "--budget-ms", "0.4", "--queries", "abc"], "invalid int value: 'abc'"),
    ("train-missing-space", ["train", "--epochs", "1", "--out", "run"], "required: --space"),
    ("export-unknown-option", [*EXPORT, "--frobnicate"], "unrecognized arguments: --frobnicate"),
    # ---- paths that are not there, or not what they should be
    ("search-supernet-missing", ["search", "--supernet", "{nowhere.pt}", "--table", T, "--budget-ms", "0.4"],
     "nowhere.pt"),
    ("search-table-missing", ["search", "--supernet", S, "--table", "{nowhere.csv}", "--budget-ms", "0.4"],
     "nowhere.csv"),
    ("export-arch-missing", ["export", "--supernet", S, "--arch", "{nowhere.json}"], "nowhere.json"),
    ("export-supernet-is-a-folder", ["export", "--supernet", "{no_train}", "--arch", ARCH], "no_train"),
    ("validate-table-missing", [*VALIDATE, "--table", "{nowhere.csv}"], "nowhere.csv"),
    ("drift-table-missing", ["latency", "drift", "--table", "{nowhere.csv}"], "nowhere.csv"),
    ("profile-profile-missing", [*PROFILE, "--profile", "{nowhere.toml}"], "nowhere.toml"),
    ("profile-unknown-profile-name", [*PROFILE, "--profile", "no-such-profile"], "no-such-profile"),
    ("train-data-missing", [*TRAIN, "--data", "imagefolder:{nowhere}"], "nowhere"),
    ("train-data-no-train-folder", [*TRAIN, "--data", "imagefolder:{no_train}"], "no_train"),
    ("train-data-is-a-file", [*TRAIN, "--data", "imagefolder:{afile}"], "afile"),
    ("train-unknown-dataset", [*TRAIN, "--data", "mnist-of-cats"], "mnist-of-cats"),
    ("demo-supernet-missing", ["demo", "--supernet", "{nowhere.pt}"], "nowhere.pt"),
    ("import-ofa-missing", ["import", "ofa", "--checkpoint", "{nowhere.pth}", "--width", "1.0", "--out", "run"],
     "nowhere.pth"),
    # ---- bad JSON and arch JSON that is not exactly an arch
    ("export-arch-bad-json", ["export", "--supernet", S, "--arch", "{bad.json}"], "bad.json"),
    ("export-arch-empty-file", ["export", "--supernet", S, "--arch", "{empty.json}"], "empty.json"),
    ("export-arch-a-list", ["export", "--supernet", S, "--arch", "{list.json}"], "list.json"),
    ("export-arch-inline-bad-json", ["export", "--supernet", S, "--arch", "{\"space\": "], "JSON"),
    ("export-arch-other-space", ["export", "--supernet", S, "--arch", "{wrong_space.json}"], "mbv3-224"),
    ("export-arch-depth-float", ["export", "--supernet", S, "--arch", "{depth_float.json}"], "'depths'"),
    ("export-arch-kernel-string", ["export", "--supernet", S, "--arch", "{kernel_string.json}"], "'kernels'"),
    ("export-arch-depth-out-of-range", ["export", "--supernet", S, "--arch", "{depth_big.json}"], "depth"),
    ("export-arch-kernel-not-offered", ["export", "--supernet", S, "--arch", "{kernel_odd.json}"], "kernel"),
    ("export-arch-unknown-field", ["export", "--supernet", S, "--arch", "{unknown_field.json}"], "width"),
    ("export-arch-resolution-string", ["export", "--supernet", S, "--arch", "{resolution_string.json}"],
     "'resolution'"),
    ("search-seed-from-missing", [*SEARCH, "--budget-ms", "0.4", "--seed-from", "{nowhere}"], "nowhere"),
    # ---- corrupt and foreign checkpoints
    ("search-checkpoint-garbage", ["search", "--supernet", "{garbage.pt}", "--table", T, "--budget-ms", "0.4"],
     "garbage.pt"),
    ("search-checkpoint-empty", ["search", "--supernet", "{empty.pt}", "--table", T, "--budget-ms", "0.4"],
     "empty.pt"),
    ("export-checkpoint-truncated", ["export", "--supernet", "{truncated.pt}", "--arch", ARCH], "truncated.pt"),
    ("search-checkpoint-nan-weights", ["search", "--supernet", "{nan.pt}", "--table", T, "--budget-ms", "0.4"],
     "nan.pt"),
    ("export-checkpoint-nan-weights", ["export", "--supernet", "{nan.pt}", "--arch", ARCH], "nan.pt"),
    ("export-checkpoint-wrong-shape", ["export", "--supernet", "{wrong_shape.pt}", "--arch", ARCH],
     "wrong_shape.pt"),
    # ---- corrupt and foreign tables
    ("search-table-no-meta", [*SEARCH[:3], "--table", "{table_no_meta}/" + TABLE.name, "--budget-ms", "0.4"],
     "meta.json"),
    ("search-table-bad-meta", ["search", "--supernet", S, "--table", "{table_bad_meta}/" + TABLE.name,
                               "--budget-ms", "0.4"], "meta.json"),
    ("search-table-meta-a-list", ["search", "--supernet", S, "--table", "{table_meta_list}/" + TABLE.name,
                                  "--budget-ms", "0.4"], "meta.json"),
    ("search-table-garbage", ["search", "--supernet", S, "--table", "{table_garbage}/" + TABLE.name,
                              "--budget-ms", "0.4"], TABLE.name),
    ("search-table-missing-block", ["search", "--supernet", S, "--table", "{table_missing_row}/" + TABLE.name,
                                    "--budget-ms", "0.4"], "no entry for block"),
    ("search-table-of-another-space", ["search", "--supernet", S, "--table", str(TABLE_224), "--budget-ms", "4"],
     "space"),
    ("export-table-of-another-space", [*EXPORT, "--table", str(TABLE_224), "--budget-ms", "4"], "space"),
    ("validate-table-garbage", [*VALIDATE, "--table", "{table_garbage}/" + TABLE.name], TABLE.name),
    ("validate-table-bad-meta", [*VALIDATE, "--table", "{table_bad_meta}/" + TABLE.name], "meta.json"),
    # ---- corrupt profiles
    ("profile-toml-syntax", [*PROFILE, "--profile", "{syntax.toml}"], "syntax.toml"),
    ("profile-toml-unknown-backend", [*PROFILE, "--profile", "{unknown_backend.toml}"], "abacus"),
    ("profile-toml-zero-threads", [*PROFILE, "--profile", "{zero_threads.toml}"], "threads"),
    ("export-profile-syntax", [*EXPORT, "--profile", "{syntax.toml}"], "syntax.toml"),
    ("demo-profile-missing", ["demo", "--profile", "{nowhere.toml}"], "nowhere.toml"),
    # ---- impossible budgets and counts
    ("search-budget-below-every-subnet", [*SEARCH, "--budget-ms", "0.001"], "no subnet"),
    ("search-budget-negative", [*SEARCH, "--budget-ms", "-1"], "budget"),
    ("search-budget-nan", [*SEARCH, "--budget-ms", "nan"], "budget"),
    ("search-table-budget-below-every-subnet", ["search", "--supernet", S, "--table", T + ":0.001", "--queries", "4"],
     TABLE.name),
    ("search-table-budget-not-a-number", ["search", "--supernet", S, "--table", T + ":0.4,fast"], "milliseconds"),
    ("search-no-budget", ["search", "--supernet", S, "--table", T], "budget"),
    ("search-queries-zero", [*SEARCH, "--budget-ms", "0.4", "--queries", "0"], "--queries"),
    ("search-population-one", [*SEARCH, "--budget-ms", "0.4", "--population", "1"], "--population"),
    ("search-margin-too-big", [*SEARCH, "--budget-ms", "0.4", "--margin", "0.7"], "--margin"),
    ("search-val-size-not-whole", [*SEARCH, "--budget-ms", "0.4", "--val-size", "2.5"], "--val-size"),
    ("search-time-limit-zero", [*SEARCH, "--budget-ms", "0.4", "--time-limit", "0"], "--time-limit"),
    ("search-unknown-strategy", [*SEARCH, "--budget-ms", "0.4", "--strategy", "telepathy"], "telepathy"),
    ("search-confirm-beyond-queries", [*SEARCH, "--budget-ms", "0.4", "--confirm", "9"], "--confirm"),
    ("export-budget-negative", [*EXPORT, "--budget-ms", "-1"], "budget"),
    ("export-test-batches-zero", [*EXPORT[:-1], "0"], "--test-batches"),
    ("train-epochs-zero", ["train", "--space", "mbv3-32", "--epochs", "0", "--out", "run"], "epochs"),
    ("train-lr-negative", [*TRAIN, "--lr", "-0.1"], "lr"),
    ("train-batch-size-zero", [*TRAIN, "--batch-size", "0"], "batch"),
    ("train-unknown-space", ["train", "--space", "mbv9", "--epochs", "1", "--out", "run"], "mbv9"),
    ("demo-val-images-zero", ["demo", "--val-images", "0"], "--val-images"),
    ("demo-budget-negative", ["demo", "--budget-ms", "-2"], "budget"),
    ("profile-rounds-zero", [*PROFILE, "--profile", "cpu-onnxruntime", "--rounds", "0"], "--rounds"),
    ("profile-negative-calibration", [*PROFILE, "--profile", "cpu-onnxruntime", "--calibration-subnets", "-1"],
     "--calibration-subnets"),
    ("profile-unknown-space", ["profile", "--profile", "cpu-onnxruntime", "--space", "mbv9"], "mbv9"),
    ("validate-n-zero", ["latency", "validate", "--table", T, "--n", "0"], "--n"),
    ("profile-in-channels-zero", [*PROFILE, "--profile", "cpu-onnxruntime", "--in-channels", "0"], "--in-channels"),
    ("profile-num-classes-negative", [*PROFILE, "--profile", "cpu-onnxruntime", "--num-classes", "-3"],
     "--num-classes"),
    ("profile-like-garbage", ["profile", "--profile", "cpu-onnxruntime", "--like", "{garbage.pt}"], "garbage.pt"),
    ("profile-like-disagrees", [*PROFILE, "--profile", "cpu-onnxruntime", "--like", S, "--in-channels", "3"],
     "--like"),
    ("search-table-budget-zero", ["search", "--supernet", S, "--table", T + ":0"], "positive"),
    ("export-val-size-zero", [*EXPORT, "--val-size", "0"], "--val-size"),
    ("export-val-size-beyond-data", [*EXPORT, "--val-size", "70000"], "val_size"),
    ("train-val-size-zero", [*TRAIN, "--val-size", "0"], "--val-size"),
    ("train-class-only-in-val", [*TRAIN, "--data", "imagefolder:{class_only_in_val}"], "class_only_in_val"),
    # ---- degenerate data
    ("train-one-class", [*TRAIN, "--data", "imagefolder:{one_class}"], "one_class"),
    ("train-empty-class", [*TRAIN, "--data", "imagefolder:{empty_class}"], "empty_class"),
    ("train-subset-beyond-data", [*TRAIN, "--train-subset", "100000000"], "--train-subset"),
    ("search-data-of-another-shape", [*SEARCH, "--budget-ms", "0.4", "--data", "imagefolder:{empty_class}"],
     "empty_class"),
    # ---- outputs that cannot be written
    ("search-out-is-a-file", [*SEARCH, "--budget-ms", "0.4", "--out", "{afile}"], "is a file"),
    ("export-out-under-a-file", [*EXPORT, "--out", "{afile}/sub"], "is a file"),
    ("train-out-in-proc", [*TRAIN, "--out", "/proc/hwnas-bad-input"], "/proc"),
    ("profile-out-is-a-file", [*PROFILE, "--profile", "cpu-onnxruntime", "--out", "{afile}"], "is a file"),
    ("validate-out-is-a-file", [*VALIDATE, "--table", T, "--out", "{afile}"], "is a file"),
    ("demo-out-in-sys", ["demo", "--out", "/sys/hwnas-bad-input"], "/sys"),
    ("export-out-dev-full", [*EXPORT, "--out", "/dev/full"], "is a file"),
    ("train-out-under-dev-null", [*TRAIN[:-1], "/dev/null/run"], "is a file"),
]


def _fill(args: list[str], inputs: Inputs) -> list[str]:
    filled = []
    for arg in args:
        while "{" in arg and "}" in arg and not arg.startswith("{\""):
            start, end = arg.index("{"), arg.index("}")
            arg = arg[:start] + getattr(inputs, arg[start + 1:end]) + arg[end + 1:]
        filled.append(arg)
    return filled


def test_the_suite_covers_every_command_and_enough_cases() -> None:
    commands = {args[0] for _, args, _ in CASES}
    assert {"demo", "profile", "latency", "train", "search", "export", "import"} <= commands
    assert len(CASES) >= 60


@pytest.mark.parametrize(("args", "expected"), [pytest.param(a, e, id=i) for i, a, e in CASES])
def test_bad_input_is_one_line_and_changes_nothing(hwnas_cli: object, inputs: Inputs, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch, args: list[str],
                                                   expected: str) -> None:
    argv = _fill(args, inputs)
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    before = digest_tree(inputs.root, *WATCHED)
    result = hwnas_cli(*argv)  # type: ignore[operator]
    code, err = result.returncode, result.stderr
    assert code == 2, f"exit {code}: {err}"
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1, f"expected one line, got {len(lines)}:\n{err}"
    assert "Traceback" not in err and "error:" in lines[0]
    assert expected in lines[0], lines[0]
    assert list(work.iterdir()) == [], f"wrote {sorted(p.name for p in work.iterdir())}"
    assert digest_tree(inputs.root, *WATCHED) == before, "an input or a committed file changed"

