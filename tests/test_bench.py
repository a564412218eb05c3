"""bench.py: the ratios it derives, its flags, and a tiny end-to-end run so it cannot rot.
No wall-clock assertions: timings are only checked to be positive and finite."""

import json
import math

import numpy as np
import pytest

import bench


def stats(median):
    return {"median": median, "min": median, "max": median, "n": 1}


def test_headline_ratios_use_train_py_defaults_and_the_same_run_baseline():
    default = bench.variant_name("float32", False)
    results = {
        "machine": {"train_py_precision": "float32"},
        "unet": {"baseline": stats(10.0), "ours": {default: stats(25.0), "float32, XLA": stats(99.0)}},
        "ae": {"baseline": stats(4.0), "ours": {default: stats(6.0)}},
        "sampling": {"baseline": stats(300.0), "ours": {"ddpm": stats(30.0), "ddim": stats(6.0)}},
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


def test_summary_and_throughput():
    assert bench.summary([3.0, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0, "n": 3}
    assert bench.throughput([0.5, 2.0], images_per_call=8)["max"] == 16.0


def test_peak_rss_grows_with_an_allocation():
    before = bench.peak_rss_mb()
    block = np.ones(64 * 2**20 // 8)  # 64 MiB, touched
    assert bench.peak_rss_mb() >= before + 32 and block.sum() > 0


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
    assert "Mode: smoke" in text and "## Findings" in text and f"wrote {md}" in capsys.readouterr().out

    md.unlink()  # --render re-writes the same report from the JSON, measuring nothing
    assert bench.main(["--render", str(js), "--markdown", str(md)]) == 0
    assert md.read_text() == text
