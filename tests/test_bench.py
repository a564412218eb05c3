"""bench.py: the ratios it derives, its flags, and a tiny end-to-end run so it cannot rot.
No wall-clock assertions: timings are only checked to be positive and finite."""

import collections
import json
import math
import os
import pathlib
import re
import subprocess
import sys

import keras
import numpy as np
import pytest

import bench
import original
from conftest import ROOT
from modules import OriginalUNet


def stats(median):
    return {"median": median, "min": median, "max": median, "n": 1}


def test_headline_ratios_use_train_py_defaults_and_the_same_run_baseline():
    default = bench.variant_name("float32", False)
    results = {
        "machine": {"train_py_precision": "float32", "train_py_xla": False},
        "unet": {
            "baseline": stats(10.0),
            "original_compiled": stats(20.0),
            "ours": {default: stats(25.0), "float32, XLA": stats(99.0)},
        },
        "ae": {"baseline": stats(4.0), "ours": {default: stats(6.0)}},
        "sampling": {"baseline": stats(300.0), "ours": {"ddpm": stats(30.0), "ddim": stats(6.0), "dpmpp": stats(3.0)}},
        "data": {
            "ours": {"peak_rss_mb": stats(700.0), "rss_after_import_mb": stats(650.0), "images_per_s": stats(120.0)},
            "baseline": {
                "peak_rss_mb": stats(1400.0),
                "rss_after_import_mb": stats(650.0),
                "images_per_s": stats(90.0),
            },
        },
    }
    h = bench.headline(results)
    assert h["unet_train_speedup"] == pytest.approx(2.5)  # the default variant, not the fastest
    assert h["ae_train_speedup"] == pytest.approx(1.5)
    assert h["sampling_speedup_ddpm200"] == pytest.approx(10.0)
    assert h["sampling_speedup_ddim50"] == pytest.approx(50.0)
    assert h["data_peak_rss_ratio"] == pytest.approx(0.5)
    assert h["data_rss_growth_ratio"] == pytest.approx(50 / 750)
    assert h["data_images_per_s"] == 120.0
    assert h["data_over_ae_train_rate"] == pytest.approx(20.0)


def test_headline_without_xla_variants_uses_the_same_precision_without_xla():
    """A run without XLA variants (smoke, quick, --no-xla) on a machine where train.py would use
    XLA (oneDNN off, as on an AVX2 CPU): the headline takes the default precision without XLA."""
    machine = {"train_py_precision": "float32", "train_py_xla": True}
    assert bench.default_variant(machine) == "float32, XLA"
    assert bench.default_variant(machine, {"float32, XLA", "float32"}) == "float32, XLA"
    assert bench.default_variant(machine, {"float32", "mixed_bfloat16"}) == "float32"
    ours = {"float32": stats(25.0), "mixed_bfloat16": stats(30.0)}
    results = {
        "machine": machine,
        "unet": {"baseline": stats(10.0), "original_compiled": stats(20.0), "ours": ours},
        "ae": {"baseline": stats(5.0), "ours": ours},
    }
    h = bench.headline(results)
    assert h["unet_train_speedup"] == pytest.approx(2.5) and h["ae_train_speedup"] == pytest.approx(5.0)


def test_original_compiled_row_headline_and_plain_tables():
    unet = {
        "baseline": stats(10.0),
        "params": 1234,
        "layout": "original",
        "ours": {"float32": stats(20.0), "mixed_bfloat16": stats(30.0)},
        "original_compiled": stats(16.0),
        "original_compiled_params": 1234,
    }
    machine = {
        "train_py_precision": "float32",
        "train_py_xla": False,
        "gpus": ["a GPU"],
        "cpu": "a CPU",
        "cores": 2,
        "python": "3",
        "tensorflow": "2",
        "keras": "3",
        "date": "2000-01-01",
    }
    measured = {"machine": machine, "unet": unet}
    assert bench.headline(measured)["unet_ours_over_original_compiled"] == pytest.approx(1.25)  # float32 / original
    table = "\n".join(bench._training_table("t", measured["unet"], "", "eager", "float32"))
    assert "| original's UNet, compiled: plain-Keras re-implementation, our compiled train step, float32 | " in table
    assert "16.0 (16.0–16.0) | 1.60 |" in table  # × the eager baseline
    measured["headline"] = bench.headline(measured)
    text = bench.markdown(measured, bench.BenchConfig(), "full")
    assert "| ours: compiled train step, float32 (train.py default) | 20.0 (20.0–20.0) | 2.00 |" in text
    assert "| figure | value |\n| --- | --- |\n| `unet_train_speedup` | 2 |\n" in text  # no goal column
    assert "| `unet_ours_over_original_compiled` | 1.25 |" in text
    assert "(1,234 parameters; the plain-Keras re-implementation: 1,234)" in text
    assert "Made by `python bench.py` on 2000-01-01" in text


def test_command_names_the_flags_that_differ_from_the_mode():
    assert bench.command(bench.BenchConfig(markdown="x.md"), "full") == "python bench.py"
    quick = bench.parse_args(["--quick", "--only", "unet", "ae", "--no-xla", "--keep-others"])[0]
    assert bench.command(quick, "quick") == "python bench.py --mode quick --only unet ae --keep-others"
    assert bench.command(bench.MODES["quick"], "full").startswith("python bench.py --repeats 2 --unet-dim 32")


KINDS = (keras.layers.Conv2DTranspose, keras.layers.Conv2D, keras.layers.Dense, keras.layers.GroupNormalization)


def _layers_by_kind(layers):
    """{kind: [layers in the given order]} of the weighted layer kinds the UNets are made of."""
    out = collections.defaultdict(list)
    for layer in layers:
        kind = next((k for k in KINDS if isinstance(layer, k)), None)
        if kind is not None:
            out[kind].append(layer)
    return out


def _in_attribute_order(layer):
    for sub in layer._flatten_layers(include_self=False, recursive=False):
        yield sub
        yield from _in_attribute_order(sub)


def test_bench_original_unet_computes_what_the_original_layout_computes():
    """original.original_unet (plain Keras, written apart) and modules.OriginalUNet are
    the same network: same weights (matched kind by kind in creation order), same output."""
    unet = OriginalUNet(dim=8, dim_mults=(1, 2, 4), resnet_groups=4, attn_heads=2, attn_dim_head=8)
    unet.build_for((8, 8, 1))
    graph = original.original_unet(8, 1, dim=8, dim_mults=(1, 2, 4), groups=4, heads=2, dim_head=8)
    assert graph.count_params() == unet.count_params()
    ours = _layers_by_kind(_in_attribute_order(unet))
    created = lambda layer: int(m.group(1)) if (m := re.search(r"_(\d+)$", layer.name)) else 0  # noqa: E731
    theirs = _layers_by_kind(sorted(graph.layers, key=created))  # auto names count up in creation order
    rng = np.random.default_rng(0)
    for kind in KINDS:
        assert len(ours[kind]) == len(theirs[kind]) > 0, kind
        for a, b in zip(ours[kind], theirs[kind], strict=True):
            values = [0.3 * rng.standard_normal(tuple(w.shape)).astype("float32") for w in a.weights]
            a.set_weights(values)
            b.set_weights(values)
    x, t = rng.uniform(-1, 1, (2, 8, 8, 1)).astype("float32"), np.array([3, 150], "int32")
    expected = unet(x, t).numpy()
    np.testing.assert_allclose(graph([x, t]).numpy(), expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())
    assert np.abs(expected).std() > 1.0  # random weights: every path matters


def test_summary_and_throughput():
    assert bench.summary([3.0, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0, "n": 3}
    assert bench.throughput([0.5, 2.0], images_per_call=8)["max"] == 16.0


def test_peak_rss_grows_with_an_allocation():
    """In a fresh process: a pytest worker's own peak may already lie far above its present use."""
    code = (
        "import numpy as np, bench; before = bench.peak_rss_mb(); block = np.ones(64 * 2**20 // 8); "
        "print(bench.peak_rss_mb() - before, block.sum() > 0)"
    )
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    grown, touched = result.stdout.split()[-2:]
    assert float(grown) >= 32 and touched == "True"  # 64 MiB allocated and touched


def test_modes_and_flags():
    quick, mode, render = bench.parse_args(["--quick", "--repeats", "4"])
    assert mode == "quick" and quick.repeats == 4 and quick.unet_dim == bench.MODES["quick"].unet_dim and render is None
    full, mode, _ = bench.parse_args(["--only", "unet", "data"])
    assert mode == "full" and (full.unet_dim, full.unet_dim_mults, full.unet_batch) == (64, (1, 2, 4, 8), 64)
    assert full.only == ("unet", "data")
    with pytest.raises(SystemExit):
        bench.parse_args(["--only", "unet", "gpu"])


@pytest.mark.slow
def test_smoke_run_writes_both_reports(tmp_path, capsys):
    md, js = tmp_path / "B.md", tmp_path / "b.json"
    assert bench.main(["--mode", "smoke", "--markdown", str(md), "--json", str(js)]) == 0
    results = json.loads(js.read_text())
    for key in [
        "unet_train_speedup",
        "ae_train_speedup",
        "sampling_speedup_ddim50",
        "sampling_speedup_ddpm200",
        "data_peak_rss_ratio",
        "data_images_per_s",
    ]:
        assert math.isfinite(results["headline"][key]) and results["headline"][key] > 0, key
    assert set(results["unet"]["ours"]) == {"float32", bench.mixed_precision()}  # smoke skips XLA
    assert results["unet"]["layout"] == results["ae"]["layout"] == "original"  # the seed preset's networks
    assert results["unet"]["original_compiled_params"] == results["unet"]["params"]
    assert math.isfinite(results["headline"]["unet_ours_over_original_compiled"])
    assert results["data"]["images"] == 24
    text = md.read_text()
    for heading in [
        "## Headline",
        "### 1. UNet training",
        "### 2. Autoencoder training",
        "### 3. Sampling",
        "### 4. Data",
    ]:
        assert heading in text
    assert "Mode: smoke" in text and "| figure | value |" in text and f"wrote {md}" in capsys.readouterr().out
    assert "| original's UNet, compiled:" in text and "parameters; the plain-Keras re-implementation: " in text
    assert "| ours: compiled, batched, DPM-Solver++(2M) 3 steps |" in text

    md.unlink()  # --render re-writes the same report from the JSON, measuring nothing
    assert bench.main(["--render", str(js), "--markdown", str(md)]) == 0
    assert md.read_text() == text


def test_rewriting_the_report_keeps_its_hand_written_tail(tmp_path):
    results = json.loads((pathlib.Path(bench.__file__).parent / "bench.json").read_text())
    config, mode, _ = bench.parse_args(["--markdown", str(tmp_path / "B.md")])
    bench.write_markdown(results, config, mode)
    generated = (tmp_path / "B.md").read_text()
    assert bench.KEPT_MARKER not in generated
    tail = f"{bench.KEPT_MARKER}\n\n## Profile\n\nconvolutions: 54 %\n"
    (tmp_path / "B.md").write_text(generated + "\n" + tail)
    bench.write_markdown(results, config, mode)  # again: tables re-written, the tail kept
    assert (tmp_path / "B.md").read_text() == generated + "\n" + tail
