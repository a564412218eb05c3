"""prepare.py: the demo set, the OASIS-1 converter, the labels.csv they write, resolve_data_dir,
and the command line (`python dataset.py demo | convert-oasis1 | inspect`).

As in test_dataset.py, every input is tiny and written into tmp_path.
"""

import json
import os
import pathlib
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

import dataset
import prepare
from cli import UserError
from dataset import SPLITS
from test_dataset import gray, make_layout, save_png
from test_labels import layout_with_labels, read_csv, write_csv

PROJECT = pathlib.Path(__file__).resolve().parents[1]


def test_resolve_data_dir_returns_an_existing_folder(tmp_path):
    assert prepare.resolve_data_dir(str(tmp_path)) == tmp_path


# ----------------------------------------------------------------------------- command line


def test_cli_missing_folder_is_one_line_and_exit_1(tmp_path, capsys):
    assert prepare.main(["inspect", str(tmp_path / "nowhere")]) == 1
    captured = capsys.readouterr()
    assert captured.err.strip() == f"error: data folder not found: {tmp_path / 'nowhere'}"
    assert captured.out == ""


def test_cli_debug_shows_the_traceback(tmp_path, monkeypatch):
    with pytest.raises(UserError):
        prepare.main(["inspect", str(tmp_path / "nowhere"), "--debug"])
    monkeypatch.setenv("OASIS_LDM_DEBUG", "1")
    with pytest.raises(UserError):
        prepare.main(["inspect", str(tmp_path / "nowhere")])


def test_cli_script_exits_1_without_traceback(tmp_path):
    (tmp_path / "empty").mkdir()
    # As a user runs it: without conftest's TF_CPP_MIN_LOG_LEVEL, so that the script hides
    # TensorFlow's start-up notices itself (cli.quiet_tensorflow).
    env = {key: value for key, value in os.environ.items() if key != "TF_CPP_MIN_LOG_LEVEL"}
    result = subprocess.run(
        [sys.executable, str(PROJECT / "dataset.py"), "inspect", str(tmp_path / "empty")],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: no PNG images in")
    assert "Traceback" not in result.stderr


def test_inspect_reports_counts_sizes_modes_and_bad_files(tmp_path, capsys):
    make_layout(tmp_path, counts=(3, 1, 0))
    save_png(tmp_path / "keras_png_slices_train" / "rgb.png", np.zeros((4, 6, 3), np.uint8))
    (tmp_path / "keras_png_slices_validate" / "broken.png").write_text("x")

    assert prepare.main(["inspect", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ")}
    assert "OASIS layout" in out
    assert lines["train"].split()[1] == "4" and "8x8 (3)" in lines["train"] and "6x4 (1)" in lines["train"]
    assert "L (3)" in lines["train"] and "RGB (1)" in lines["train"]
    assert lines["validate"].split()[1] == "1" and lines["test"].split()[1] == "0"
    assert "unreadable" in out and "broken.png: not a PNG file" in out
    assert lines["masks"].split()[1:5] == ["test", "0", "of", "0"]  # one line a split, the last one here
    assert (
        "masks     train          3 of 4 images" in out
        and "no mask for " + str(tmp_path / "keras_png_slices_train" / "rgb.png") in out
    )
    assert "white_matter 100.0 %" in out


def test_inspect_fails_when_nothing_is_usable(tmp_path, capsys):
    (tmp_path / "keras_png_slices_train").mkdir()
    (tmp_path / "keras_png_slices_train" / "a.png").write_text("x")
    assert prepare.main(["inspect", str(tmp_path)]) == 1
    captured = capsys.readouterr()
    assert "a.png: not a PNG file" in captured.out
    assert captured.err.strip() == f"error: no usable training image in {tmp_path}"


# ----------------------------------------------------------------------------- demo data set


def test_demo_dataset_is_made_once_complete_and_atomically(tmp_path):
    out = tmp_path / "demo"
    leftover = tmp_path / ".demo.partial-dead"  # as a killed run leaves it
    save_png(leftover / "keras_png_slices_train" / "junk.png", gray(0, 256))

    assert prepare.ensure_demo_dataset(out) == out
    splits = dataset.find_splits(out)
    assert {k: len(v) for k, v in splits.items()} == {"train": 94, "validate": 16, "test": 8}
    assert not any("junk" in p for paths in splits.values() for p in paths)
    assert list(tmp_path.glob(".demo.partial-*")) == [leftover]  # its own temporary folder is gone
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["slices"] == {split: len(paths) for split, paths in splits.items()}

    brain_anywhere = np.zeros((256, 256), bool)
    for path in splits["train"]:
        with Image.open(path) as image:
            assert image.size == (256, 256) and image.mode == "L"
            brain_anywhere |= np.asarray(image) > 0
    rows, cols = np.nonzero(brain_anywhere)
    assert rows.min() > 20 and cols.min() > 20  # black border all round
    assert abs((rows.min() + rows.max()) / 2 - 127.5) <= 1 and abs((cols.min() + cols.max()) / 2 - 127.5) <= 1

    before = {p: pathlib.Path(p).stat().st_mtime_ns for p in splits["train"]}
    start = time.perf_counter()
    assert prepare.ensure_demo_dataset(out) == out
    assert time.perf_counter() - start < 0.5
    assert {p: pathlib.Path(p).stat().st_mtime_ns for p in splits["train"]} == before


def test_demo_holds_out_slabs_at_least_4_mm_from_any_training_slice(tmp_path):
    """Validation and test are contiguous slabs (two heights each), with 3 slices left out
    on each side, so no held-out slice is a 1-mm neighbour of a training slice."""
    out = prepare.ensure_demo_dataset(tmp_path / "demo")
    heights = {
        split: [int(pathlib.Path(p).stem.split("_z")[1]) for p in paths]
        for split, paths in dataset.find_splits(out).items()
    }
    for split in ("validate", "test"):
        assert min(abs(a - b) for a in heights[split] for b in heights["train"]) == 4
        runs_of_slices = np.split(heights[split], np.flatnonzero(np.diff(heights[split]) != 1) + 1)
        assert [len(r) for r in runs_of_slices] == ([8, 8] if split == "validate" else [4, 4])
    # The splitter alone, 142 slices: the 8-slice validation slab centred at 0.35 · 141 = 49.35
    # is 46..53, the 4-slice test slab at 0.2 · 141 = 28.2 is 27..30, each with 3 left out around.
    splits = prepare.demo_splits(142)
    picked = [splits[i] for i in (0, 23, 24, 27, 30, 31, 45, 46, 53, 54, 141)]
    assert picked == ["train", "train", None, "test", "test", None, None, "validate", "validate", None, "train"]


def test_an_older_demo_set_is_replaced_and_a_foreign_manifest_refused(tmp_path):
    out = tmp_path / "demo"
    save_png(out / "keras_png_slices_train" / "mni152_z001.png", gray(0, 256))
    (out / "manifest.json").write_text(json.dumps({"source": "nilearn x", "slices": {"train": 1}}))  # version 1
    prepare.ensure_demo_dataset(out)
    assert json.loads((out / "manifest.json").read_text())["version"] == prepare.DEMO_VERSION
    assert not (out / "keras_png_slices_train" / "mni152_z001.png").exists()
    assert list(tmp_path.iterdir()) == [out]  # no temporary or old folder left beside it

    other = tmp_path / "other"
    save_png(other / "mine.png", gray(0))
    (other / "manifest.json").write_text(json.dumps({"source": "my scanner"}))
    with pytest.raises(UserError, match="holds another data set"):
        prepare.ensure_demo_dataset(other)
    assert (other / "mine.png").exists()


def test_demo_does_not_overwrite_a_foreign_folder(tmp_path):
    save_png(tmp_path / "demo" / "mine.png", gray(0))
    with pytest.raises(UserError, match="already exists and is not empty"):
        prepare.ensure_demo_dataset(tmp_path / "demo")
    assert (tmp_path / "demo" / "mine.png").exists()


def test_demo_slices_look_like_a_t1_brain(tmp_path):
    """Axial, anterior up, T1 contrast: the mid slice is longer front to back than
    wide and has near-white (white matter) and darker (grey matter, CSF) pixels;
    the lowest slices (cerebellum, at the back of the head) sit in the lower half."""
    out = prepare.ensure_demo_dataset(tmp_path / "demo")
    bottom_to_top = [np.asarray(Image.open(p)) for p in sorted((out / "keras_png_slices_train").glob("*.png"))]
    middle = bottom_to_top[len(bottom_to_top) // 2]
    rows, cols = np.nonzero(middle)
    assert rows.max() - rows.min() > 1.1 * (cols.max() - cols.min())
    brain = middle[middle > 0]
    assert np.percentile(brain, 90) > 200 and np.percentile(brain, 10) < 150
    for low_slice in bottom_to_top[:10]:
        assert np.nonzero(low_slice)[0].mean() > 140  # image centre: 127.5


def test_demo_labels_give_each_slice_its_height(tmp_path):
    """slice = i / (n - 1) over the brain-bearing slices, bottom to top, for every PNG written."""
    out = tmp_path / "demo"
    save_png(out / "keras_png_slices_train" / "mni152_z001.png", gray(0, 256))
    (out / "manifest.json").write_text(json.dumps({"source": "nilearn x", "version": 2}))  # without labels
    prepare.ensure_demo_dataset(out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["version"] == prepare.DEMO_VERSION == 5 and manifest["labels"] == ["slice"]

    splits = dataset.find_splits(out)
    labels = dataset.find_labels(out, splits)  # every PNG has its row, or this raises
    assert labels.columns == ("slice",) and labels.source == "labels.csv"
    assert len(read_csv(out / "labels.csv")) == sum(len(paths) for paths in splits.values())
    z = {split: np.array([int(pathlib.Path(p).stem.split("_z")[1]) for p in paths]) for split, paths in splits.items()}
    every_z = np.concatenate(list(z.values()))
    every = np.concatenate([labels.values[split][:, 0] for split in SPLITS])
    assert labels.values["train"][0, 0] == 0 and labels.values["train"][-1, 0] == 1  # the lowest and highest slice
    np.testing.assert_allclose(every, (every_z - every_z.min()) / (every_z.max() - every_z.min()), atol=1e-6)
    assert 0 < labels.values["validate"].min() < labels.values["validate"].max() < 1


# ----------------------------------------------------------------------------- OASIS-1 converter

# Six subjects; subject 2 has a second session (MR2), which must land in the same split.
SESSIONS = [f"OAS1_000{i}_MR1" for i in range(1, 7)] + ["OAS1_0002_MR2"]
KEPT_Z = [3, 4, 5, 6, 7, 8]  # z 0, 1, 9 empty; z 2 holds one voxel (near-empty)


def oasis1_volume():
    """A 20x24x10 int16 volume as nibabel reads Analyze: axes to Left, Anterior, Superior.

    A block of brain at z 3..8 with a one-voxel hole at i=2 (patient's right),
    j=21 (anterior): in the PNG it must sit at the block's top-left corner.
    """
    volume = np.zeros((20, 24, 10), np.int16)
    volume[1:19, 1:23, 3:9] = 400
    volume[2, 21, 3:9] = 0
    volume[10, 10, 2] = 400
    return volume


def write_oasis1(src, sessions, disc="disc1"):
    for session in sessions:
        folder = src / disc / session / "PROCESSED" / "MPRAGE" / "T88_111"
        folder.mkdir(parents=True)
        nib.save(nib.AnalyzeImage(oasis1_volume(), np.eye(4)), folder / f"{session}_mpr_n4_anon_111_t88_masked_gfc.hdr")


def test_convert_oasis1_splits_by_subject_and_skips_empty_slices(tmp_path):
    src, out = tmp_path / "oasis", tmp_path / "png"
    write_oasis1(src, SESSIONS + ["OAS1_0007_MR1"])
    next(src.rglob("OAS1_0007_MR1_*.img")).unlink()  # an unreadable volume

    with pytest.warns(UserWarning, match="skipped 1 unreadable or empty volume.*OAS1_0007"):
        counts = prepare.convert_oasis1(src, out, val_fraction=0.2, test_fraction=0.2)

    assert counts == {split: len(list((out / f"keras_png_slices_{split}").glob("*.png"))) for split in SPLITS}
    assert sum(counts.values()) == len(SESSIONS) * len(KEPT_Z)
    subjects = {split: {p.name[:9] for p in (out / f"keras_png_slices_{split}").glob("*.png")} for split in SPLITS}
    assert all(subjects.values())
    assert sum(len(s) for s in subjects.values()) == len(set.union(*subjects.values())) == 6  # no subject twice
    z_written = {int(p.stem[-3:]) for p in out.rglob("*.png")}
    assert z_written == set(KEPT_Z)
    mr2 = next(out.rglob("OAS1_0002_MR2_slice_005.png")).parent
    assert next(out.rglob("OAS1_0002_MR1_slice_005.png")).parent == mr2  # sessions follow their subject

    image = np.asarray(Image.open(next(out.rglob("OAS1_0001_MR1_slice_005.png"))))
    assert image.shape == (256, 256) and image.dtype == np.uint8
    rows, cols = np.nonzero(image)
    assert (rows.max() - rows.min() + 1, cols.max() - cols.min() + 1) == (22, 18)  # Y rows, X columns
    assert image[rows.min() + 1, cols.min() + 1] == 0  # the anterior-right hole: top-left
    assert image[rows.min() + 1, cols.max() - 1] == 255
    assert image[rows.max() - 1, cols.min() + 1] == 255


def test_convert_oasis1_is_deterministic_and_never_overwrites(tmp_path):
    src = tmp_path / "oasis"
    write_oasis1(src, SESSIONS)
    prepare.convert_oasis1(src, tmp_path / "a", 0.2, 0.2)
    prepare.convert_oasis1(src, tmp_path / "b", 0.2, 0.2)
    listing = lambda root: sorted(str(p.relative_to(root)) for p in root.rglob("*.png"))  # noqa: E731
    assert listing(tmp_path / "a") == listing(tmp_path / "b")
    assert not list(tmp_path.glob(".*.partial-*"))
    with pytest.raises(UserError, match="already exists"):
        prepare.convert_oasis1(src, tmp_path / "a")
    write_oasis1(src, SESSIONS[:1], disc="disc2")  # the same session twice would overwrite slices
    with pytest.raises(UserError, match="1 scan.s. found more than once .* OAS1_0001_MR1"):
        prepare.convert_oasis1(src, tmp_path / "c")


def test_convert_oasis1_cli(tmp_path, capsys):
    src, out = tmp_path / "oasis", tmp_path / "png"
    write_oasis1(src, SESSIONS)
    broken = src / "disc1" / "OAS1_0009_MR1_mpr_n4_anon_111_t88_masked_gfc.hdr"
    broken.write_text("not an Analyze header")
    assert prepare.main(["convert-oasis1", str(src), "--out", str(out), "--val", "0.2", "--test", "0.2"]) == 0
    captured = capsys.readouterr()
    assert f"wrote {out}: train " in captured.out
    assert captured.err.splitlines() == [
        f"{len(SESSIONS) + 1}/{len(SESSIONS) + 1} volumes converted",  # stderr is no terminal: final count only
        f"warning: skipped 1 unreadable or empty volume(s): {broken}",
    ]
    assert len(dataset.find_splits(out)["train"]) > 0

    assert prepare.main(["convert-oasis1", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")]) == 1
    assert capsys.readouterr().err.strip() == f"error: data folder not found: {tmp_path / 'nothing'}"
    assert prepare.main(["convert-oasis1", str(out), "--out", str(tmp_path / "x")]) == 1
    assert "no OASIS-1 volumes" in capsys.readouterr().err


# ----------------------------------------------------------------------------- OASIS-1 converter: labels.csv

CLINICAL_HEADER = "ID,M/F,Hand,Age,Educ,SES,MMSE,CDR,eTIV,nWBV,ASF,Delay".split(",")
# Subjects 4 to 6 are young controls: no Educ, SES, MMSE, CDR. OAS1_0002_MR2 has no row of its
# own (its subject's MR1 gives its values); OAS1_0099_MR1 has no volume.
CLINICAL = [
    ["OAS1_0001_MR1", "F", "R", "74", "2", "3", "29", "0", "1344", "0.743", "1.306", "N/A"],
    ["OAS1_0002_MR1", "F", "R", "55", "4", "1", "29", "0", "1147", "0.81", "1.531", "N/A"],
    ["OAS1_0003_MR1", "F", "R", "73", "4", "3", "27", "0.5", "1454", "0.708", "1.207", "N/A"],
    ["OAS1_0004_MR1", "M", "R", "28", "", "", "", "", "1588", "0.803", "1.105", "N/A"],
    ["OAS1_0005_MR1", "M", "R", "18", "", "", "", "", "1737", "0.848", "1.01", "N/A"],
    ["OAS1_0006_MR1", "F", "R", "24", "", "", "", "", "1131", "0.862", "1.551", "N/A"],
    ["OAS1_0099_MR1", "M", "R", "80", "1", "1", "20", "1", "1500", "0.7", "1.2", "N/A"],
]


def test_convert_oasis1_writes_slice_labels(tmp_path):
    src, out = tmp_path / "oasis", tmp_path / "png"
    write_oasis1(src, SESSIONS)
    prepare.convert_oasis1(src, out, 0.2, 0.2)
    assert json.loads((out / "manifest.json").read_text())["labels"] == ["slice"]
    rows = read_csv(out / "labels.csv")
    assert len(rows) == len(list(out.rglob("*.png")))
    for name, row in rows.items():
        assert list(row) == ["slice"]
        z = int(name[-7:-4])  # KEPT_Z = 3..8 are the brain-bearing slices: (z - 3) / 5
        assert float(row["slice"]) == pytest.approx((z - 3) / 5)
    labels = dataset.find_labels(out, dataset.find_splits(out))
    assert labels.columns == ("slice",)


def test_convert_oasis1_joins_the_clinical_table(tmp_path):
    src, out = tmp_path / "oasis", tmp_path / "png"
    write_oasis1(src, SESSIONS + ["OAS1_0007_MR1"])  # subject 7 has no row at all
    clinical = write_csv(tmp_path / "oasis_cross-sectional.csv", [CLINICAL_HEADER] + CLINICAL)

    with pytest.warns(UserWarning, match=r"^1 scan\(s\) have no row in .*left empty: OAS1_0007_MR1$"):
        prepare.convert_oasis1(src, out, 0.2, 0.2, clinical=clinical)

    columns = ["slice", "age", "sex", "cdr", "mmse", "nwbv", "etiv"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["labels"] == columns and manifest["scans_without_clinical"] == ["OAS1_0007_MR1"]
    rows = read_csv(out / "labels.csv")
    by_session = {name.split("/")[1][:13]: row for name, row in rows.items()}
    assert list(by_session["OAS1_0001_MR1"]) == columns
    assert {k: by_session["OAS1_0001_MR1"][k] for k in columns[1:]} == dict(
        age="74", sex="1", cdr="0", mmse="29", nwbv="0.743", etiv="1344"
    )
    assert by_session["OAS1_0004_MR1"]["sex"] == "0"
    assert by_session["OAS1_0004_MR1"]["cdr"] == by_session["OAS1_0004_MR1"]["mmse"] == ""  # unknown, not 0
    assert by_session["OAS1_0002_MR2"]["age"] == "55"  # the subject's other session
    assert all(by_session["OAS1_0007_MR1"][k] == "" for k in columns[1:])
    assert by_session["OAS1_0007_MR1"]["slice"] != ""

    labels = dataset.find_labels(out, dataset.find_splits(out))
    assert labels.columns == tuple(columns)
    every = np.concatenate(list(labels.values.values()))
    assert np.isnan(every[:, 3]).sum() == 4 * 6  # cdr unknown: subjects 4, 5, 6, 7 (6 slices each)
    assert set(np.unique(every[:, 2][~np.isnan(every[:, 2])])) == {0.0, 1.0}


@pytest.mark.parametrize(
    "header, row, message",
    [
        (["Subject", "M/F"], ["OAS1_0001_MR1", "F"], "has no ID column .header: Subject,M/F."),
        (["ID", "M/F", "Age"], ["OAS1_0001_MR1", "F", "74"], "lacks the column.s. CDR, MMSE, nWBV, eTIV"),
        (
            CLINICAL_HEADER,
            ["OAS1_0001_MR1", "X", *CLINICAL[0][2:]],
            "OAS1_0001_MR1 .line 2. has M/F 'X', expected M or F",
        ),
        (
            CLINICAL_HEADER,
            [*CLINICAL[0][:3], "old", *CLINICAL[0][4:]],
            "OAS1_0001_MR1 .line 2. has Age 'old', not a number",
        ),
    ],
)
def test_a_bad_clinical_table_is_a_data_error_before_any_conversion(tmp_path, header, row, message):
    src, out = tmp_path / "oasis", tmp_path / "png"
    write_oasis1(src, SESSIONS[:1])
    clinical = write_csv(tmp_path / "clinical.csv", [header, row])
    with pytest.raises(UserError, match=message):
        prepare.convert_oasis1(src, out, 0, 0, clinical=clinical)
    assert not out.exists()
    with pytest.raises(UserError, match="clinical file not found: .*nowhere.csv"):
        prepare.convert_oasis1(src, out, 0, 0, clinical=tmp_path / "nowhere.csv")
    write_csv(clinical, [CLINICAL_HEADER, CLINICAL[0], CLINICAL[0]])
    with pytest.raises(UserError, match="OAS1_0001_MR1 has more than one row .line 3."):
        prepare.convert_oasis1(src, out, 0, 0, clinical=clinical)


def test_convert_oasis1_cli_with_clinical(tmp_path, capsys):
    src, out = tmp_path / "oasis", tmp_path / "png"
    write_oasis1(src, SESSIONS)
    clinical = write_csv(tmp_path / "oasis_cross-sectional.csv", [CLINICAL_HEADER] + CLINICAL)
    assert prepare.main(["convert-oasis1", str(src), "--out", str(out), "--clinical", str(clinical)]) == 0
    assert "warning" not in capsys.readouterr().err
    assert list(next(iter(read_csv(out / "labels.csv").values()))) == [
        "slice",
        "age",
        "sex",
        "cdr",
        "mmse",
        "nwbv",
        "etiv",
    ]

    assert prepare.main(["convert-oasis1", str(src), "--out", str(tmp_path / "x"), "--clinical", "nowhere.csv"]) == 1
    assert capsys.readouterr().err.strip() == "error: clinical file not found: nowhere.csv"


# ----------------------------------------------------------------------------- inspect


def test_inspect_lists_the_label_columns(tmp_path, capsys):
    layout_with_labels(tmp_path)
    assert prepare.main(["inspect", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "  labels from labels.csv: 2 column(s)" in out
    columns = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.startswith("    ")}
    assert columns["slice"] == "min 0 max 20 distinct 3 missing 0".split()
    assert columns["age"] == "min 70 max 72 distinct 3 missing 1".split()


def test_inspect_without_labels_and_with_a_bad_labels_csv(tmp_path, capsys):
    make_layout(tmp_path)
    assert prepare.main(["inspect", str(tmp_path)]) == 0
    assert "  labels: none (no labels.csv)" in capsys.readouterr().out

    write_csv(tmp_path / "labels.csv", [["file", "age"], ["keras_png_slices_train/case_0.png", "1"]])
    assert prepare.main(["inspect", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "5 image(s) have no row, e.g." in err
