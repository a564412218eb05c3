"""predict.py on one tiny trained run: the files it writes, determinism under a seed,
the interpolation (and the `initial_noise` argument of the samplers it relies on),
choosing the run, and the one-line errors that leave the run untouched."""

import copy
import dataclasses
import os
import shutil
import subprocess
import sys

import keras
import numpy as np
import pytest
from PIL import Image

import cli
import config as cfg
import predict
import runs
from conftest import ROOT, copy_of, snapshot


@pytest.fixture(scope="module")
def loaded(tiny_run):
    return runs.load_run(tiny_run)


def copy_run(run_dir, dest, without=()):
    """The files a run needs (no checkpoints, logs), minus `without`."""
    os.makedirs(dest)
    for name in ["config.json", "encoder.weights.h5", "decoder.weights.h5", "unet_ema.weights.h5"]:
        if name not in without:
            shutil.copy2(os.path.join(run_dir, name), dest)
    return str(dest)


FAST = ["--n", "4", "--steps", "4", "--batch-size", "4"]


# ---------------------------------------------------------------------------- end to end


def test_writes_every_file_and_the_same_seed_gives_the_same_bytes(tiny_run, loaded, tmp_path, capsys):
    run_dir = copy_of(tiny_run, tmp_path / "tiny")  # the default --out writes into the run: not the shared one
    assert predict.main(["--run", run_dir, "--seed", "7"] + FAST) == 0
    out = os.path.join(run_dir, "predictions")
    assert f"wrote {out}" in capsys.readouterr().out
    names = sorted(os.listdir(out))
    assert names == [
        "denoising.png",
        "interpolation.png",
        "sample_000.png",
        "sample_001.png",
        "sample_002.png",
        "sample_003.png",
        "samples.png",
    ]
    for figure in ["denoising.png", "interpolation.png", "samples.png"]:
        assert os.path.getsize(os.path.join(out, figure)) > 2000
    # The PNGs are exactly the sampler's images at the run's size, converted by round((x + 1) * 127.5).
    expected = predict.to_uint8(
        runs.generate(loaded, 4, cfg.SamplingOptions(steps=4, seed=7, batch_size=4), progress=False).images
    )
    assert expected.shape == (4, 16, 16, 1) and expected.std() > 0
    for i in range(4):
        with Image.open(os.path.join(out, f"sample_{i:03d}.png")) as png:
            assert png.size == (16, 16) and png.mode == "L"
            np.testing.assert_array_equal(np.asarray(png), expected[i, :, :, 0])

    # A second process-like call (models rebuilt from the files) with the same seed: the same bytes.
    assert predict.main(["--run", run_dir, "--seed", "7", "--out", str(tmp_path / "again")] + FAST) == 0
    assert snapshot(tmp_path / "again") == snapshot(out)


@pytest.mark.slow
def test_the_command_in_a_fresh_process_writes_the_same_bytes(tiny_run, tmp_path):
    """`python predict.py` in its own process (fresh TensorFlow state) against an in-process call."""
    assert predict.main(["--run", tiny_run, "--seed", "7", "--out", str(tmp_path / "here")] + FAST) == 0
    command = [sys.executable, "predict.py", "--run", tiny_run, "--seed", "7", "--out", str(tmp_path / "there")] + FAST
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert snapshot(tmp_path / "there") == snapshot(tmp_path / "here")


def test_models_compute_in_float32_whatever_the_global_policy(tiny_run, loaded):
    """train.py leaves e.g. mixed_bfloat16 set; a run loaded afterwards must still sample in float32."""
    keras.config.set_dtype_policy("mixed_bfloat16")
    run = runs.load_run(tiny_run)
    assert keras.config.dtype_policy().name == "mixed_bfloat16"  # restored
    for model in (run.autoencoder.decoder, run.diffusion.ema_network):
        assert {layer.dtype_policy.name for layer in model.layers} == {"float32"}
    a, b = (
        runs.generate(r, 2, cfg.SamplingOptions(steps=4, seed=7, batch_size=2), progress=False).images
        for r in (run, loaded)
    )
    np.testing.assert_array_equal(a, b)


def test_another_seed_gives_other_images(loaded):
    a, b = (
        runs.generate(loaded, 4, cfg.SamplingOptions(steps=4, seed=seed, batch_size=4), progress=False).images
        for seed in (7, 8)
    )
    assert all(np.abs(a[i] - b[i]).max() > 1e-2 for i in range(4))


def test_sampling_clips_x0_to_the_runs_latent_range(loaded):
    """DDIM's last step returns its (clipped) x0 estimate, so every latent lies within ± the
    run's latent_max_abs; a run without it (made before it was recorded) is not clipped."""
    assert loaded.config.latent_max_abs > 1.0  # recorded by train.py
    config = copy.deepcopy(loaded.config)
    config.latent_max_abs = 0.5
    clipped = runs.generate(
        dataclasses.replace(loaded, config=config), 4, cfg.SamplingOptions(steps=4, seed=7), progress=False
    )
    assert np.abs(clipped.latents).max() <= 0.5 + 1e-6
    config.latent_max_abs = None
    free = runs.generate(
        dataclasses.replace(loaded, config=config), 4, cfg.SamplingOptions(steps=4, seed=7), progress=False
    )
    assert np.abs(free.latents).max() > 0.5


def test_batches_use_distinct_seeds(loaded):
    images = runs.generate(loaded, 4, cfg.SamplingOptions(steps=4, seed=7, batch_size=2), progress=False).images
    assert np.abs(images[:2] - images[2:]).max() > 1e-2  # batch 1 is not a copy of batch 0


def test_save_samples_removes_older_samples_only(tmp_path):
    images = np.linspace(-1, 1, 5 * 16 * 16).reshape(5, 16, 16, 1)
    (tmp_path / "sample_notes.png").write_bytes(b"not ours")
    assert len(predict.save_samples(images, str(tmp_path), ("png", "png16"))) == 10
    paths = predict.save_samples(images[:2], str(tmp_path))
    assert [os.path.basename(p) for p in paths] == ["sample_000.png", "sample_001.png"]
    assert sorted(os.listdir(tmp_path)) == ["sample_000.png", "sample_001.png", "sample_notes.png"]


def test_ddpm_sampler_and_denoising_states(loaded):
    samples = runs.generate(
        loaded, 2, cfg.SamplingOptions(sampler="ddpm", seed=1, batch_size=2), num_states=6, progress=False
    )
    assert samples.images.shape == (2, 16, 16, 1) and samples.latents.shape == (2, 8, 8, 2)
    assert samples.states.shape == (6, 2, 8, 8, 2)
    np.testing.assert_array_equal(samples.timesteps, [20, 16, 12, 8, 4, 0])  # T = 20 steps, evenly recorded
    np.testing.assert_array_equal(samples.states[-1], samples.latents)
    assert np.all(np.abs(samples.images) <= 1.0)


# ---------------------------------------------------------------------------- interpolation, initial_noise


def test_interpolation_ends_are_the_samples_of_its_two_noises(loaded):
    samples = runs.generate(loaded, 2, cfg.SamplingOptions(steps=4, seed=3, batch_size=2), num_states=2, progress=False)
    images = predict.interpolate(
        loaded, samples.states[0, 0], samples.states[0, 1], 5, cfg.SamplingOptions(steps=4, seed=3)
    )
    assert images.shape == (5, 16, 16, 1)
    # Equal up to float32 round-off: a batch of 5 is not a batch of 2 to the convolutions
    # (TensorFlow's own CPU kernels, oneDNN off, differ by up to 1.5e-5 here).
    np.testing.assert_allclose(images[0], samples.images[0], atol=1e-4)
    np.testing.assert_allclose(images[-1], samples.images[1], atol=1e-4)
    assert np.abs(images[2] - images[0]).max() > 1e-3 and np.abs(images[2] - images[-1]).max() > 1e-3


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_run_sampler_passes_initial_noise_to_both_samplers(loaded, sampler):
    """Sampler.sample(initial_noise=...) through a run's sampler (test_samplers.py covers Sampler.ddim itself)."""
    shape = (3, *loaded.latent_shape)

    def sample(seed, **kwargs):
        return loaded.sampler.sample(shape, cfg.SamplingOptions(sampler=sampler, steps=4, seed=seed), **kwargs)

    seeded, states, _ = sample(5, num_intermediates=2)
    # The seed's own x_T, passed explicitly: the same latents (the seed still draws DDPM's per-step noise).
    given = sample(5, initial_noise=states[0])
    np.testing.assert_array_equal(given.numpy(), seeded.numpy())
    # Another seed with the same x_T: DDIM (eta = 0) depends on x_T only, DDPM does not.
    other = sample(6, initial_noise=states[0]).numpy()
    if sampler == "ddim":
        np.testing.assert_array_equal(other, seeded.numpy())
    else:
        assert np.abs(other - seeded.numpy()).max() > 1e-3


def test_slerp_known_values():
    a, b = np.zeros((2, 2)), np.zeros((2, 2))
    a[0, 0], b[1, 1] = 2.0, 2.0  # orthogonal, both of norm 2
    out = predict.slerp(a, b, [0.0, 0.5, 1.0])
    assert out.shape == (3, 2, 2) and out.dtype == np.float32
    np.testing.assert_allclose(out[0], a)
    np.testing.assert_allclose(out[2], b)
    np.testing.assert_allclose(out[1], (a + b) / np.sqrt(2), rtol=1e-6)  # sin(π/4) / sin(π/2) each
    # Two random noises of equal norm: the norm stays the same all along the path.
    x, y = np.random.default_rng(0).standard_normal((2, 4, 4, 2))
    y *= np.linalg.norm(x) / np.linalg.norm(y)
    path = predict.slerp(x, y, np.linspace(0, 1, 7))
    np.testing.assert_allclose(np.linalg.norm(path.reshape(7, -1), axis=1), np.linalg.norm(x), rtol=1e-5)
    # Parallel inputs (angle 0): the formula's 0/0 is replaced by the linear mix.
    np.testing.assert_allclose(predict.slerp(x, 2 * x, [0.5])[0], 1.5 * x, rtol=1e-6)


def test_default_steps_are_capped_at_t():
    options = cfg.SamplingOptions()
    assert (options.resolved(1000).steps, cfg.SamplingOptions(steps=7).resolved(1000).steps) == (50, 7)
    assert cfg.SamplingOptions(sampler="dpmpp").resolved(1000).steps == 20
    assert options.resolved(20).steps == 20
    assert cfg.SamplingOptions(sampler="dpmpp").resolved(10).steps == 10
    assert cfg.SamplingOptions(sampler="dpmpp", steps=20).label(10) == "DPM-Solver++(2M) 20 steps"
    assert [cfg.SamplingOptions(sampler=s, steps=7).network_evaluations(10) for s in ("ddim", "dpmpp", "ddpm")] == [
        7,
        7,
        10,
    ]


def test_sampling_options_from_the_flags():
    """cli.sampling_options: one SamplingOptions from predict.py's flags, steps resolved for the run's T,
    and a one-line UserError for options the run cannot honour."""
    config = cfg.preset("demo")
    config.diffusion.timesteps = 30
    parser = cli.FlagParser(prog="predict.py")
    cli.add_sampling_arguments(parser, n=4)
    args = parser.parse_args(["--sampler", "ddim", "--eta", "0.5", "--seed", "3", "--batch-size", "2"])
    assert cli.sampling_options(args, config, guidance=2.0) == cfg.SamplingOptions("ddim", 30, 0.5, 3, 2, 2.0)
    bad = {
        ("--steps", "31"): r"--steps must be in \[1, 30\] \(the run's T\), got 31",
        ("--sampler", "dpmpp", "--eta", "1"): "--eta applies to the ddim sampler only",
        ("--seed", "-1"): "--seed must be >= 0",
        ("--batch-size", "0"): "--n and --batch-size must be positive",
    }
    for flags, message in bad.items():
        with pytest.raises(cli.UserError, match=message):
            cli.sampling_options(parser.parse_args(list(flags)), config, guidance=3.0)
    with pytest.raises(cli.UserError, match="invalid choice: 'euler'"):
        parser.parse_args(["--sampler", "euler"])


def test_dpmpp_through_the_command_line(tiny_run, loaded, tmp_path, capsys):
    """--sampler dpmpp: the default 20 steps (capped at T = 20), in the log line and the PNGs."""
    out = tmp_path / "dpmpp"
    assert (
        predict.main(["--run", tiny_run, "--sampler", "dpmpp", "--n", "2", "--batch-size", "2", "--out", str(out)]) == 0
    )
    assert "DPM-Solver++(2M) 20 steps" in capsys.readouterr().out
    expected = runs.generate(loaded, 2, cfg.SamplingOptions("dpmpp", 20, batch_size=2), progress=False).images
    with Image.open(out / "sample_001.png") as png:
        np.testing.assert_array_equal(np.asarray(png), predict.to_uint8(expected)[1, :, :, 0])


def test_to_uint8_and_batch_seeds():
    x = np.array([-1.0, 0.0, 1.0, -3.0, 3.0, 0.5, -0.999])
    np.testing.assert_array_equal(predict.to_uint8(x), [0, 128, 255, 0, 255, 191, 0])
    seeds = {runs.batch_seed(s, b) for s in range(4) for b in range(4)}
    assert len(seeds) == 16 and all(0 <= s < 2**31 for s in seeds)
    assert runs.batch_seed(3, 2) == runs.batch_seed(3, 2)


# ---------------------------------------------------------------------------- choosing the run


def test_resolve_run_picks_the_newest_config(tmp_path, monkeypatch):
    for i, name in enumerate(["old", "new", "middle"]):
        (tmp_path / "runs" / name).mkdir(parents=True)
        (tmp_path / "runs" / name / "config.json").write_text("{}")
        os.utime(tmp_path / "runs" / name / "config.json", (1000 + 100 * [0, 2, 1][i],) * 2)
    (tmp_path / "runs" / "no-config").mkdir()
    monkeypatch.chdir(tmp_path)
    assert runs.resolve_run(None) == os.path.join("runs", "new")
    assert runs.resolve_run("old") == os.path.join("runs", "old")
    assert runs.resolve_run(str(tmp_path / "runs" / "middle")) == str(tmp_path / "runs" / "middle")


# ---------------------------------------------------------------------------- errors


def edit_config(run_dir, **unet):
    config = cfg.load_config(os.path.join(run_dir, "config.json"))
    for key, value in unet.items():
        setattr(config.unet, key, value)
    cfg.save_config(config, os.path.join(run_dir, "config.json"))


ERRORS = {
    "no runs": (None, None, "error: no runs under runs/: train one first"),
    "missing run": ("missing", None, "error: run not found: {tmp}/missing"),
    "not trained": (
        "run",
        dict(without=["unet_ema.weights.h5"]),
        "error: {tmp}/run is not fully trained yet (unet_ema.weights.h5); "
        "finish it with: python train.py --out {tmp}/run --resume",
    ),
    "other config": (
        "run",
        dict(unet_dim=16),
        "error: weights in {tmp}/run/unet_ema.weights.h5 do not match config.json (A total of",
    ),
    "bad config": ("run", dict(config_text="{not json"), "error: {tmp}/run/config.json is not a valid run config: "),
    "damaged weights": (
        "run",
        dict(truncate="unet_ema.weights.h5"),
        "error: cannot read {tmp}/run/unet_ema.weights.h5: ",
    ),
    "steps > T": ("run", dict(argv=["--steps", "21"]), "error: --steps must be in [1, 20] (the run's T), got 21"),
    "eta without ddim": (
        "run",
        dict(argv=["--sampler", "dpmpp", "--eta", "1"]),
        "error: --eta applies to the ddim sampler only, got --eta 1 with dpmpp",
    ),
    "out is a file": (
        "run",
        dict(argv=["--out", "{tmp}/run/config.json"]),
        "error: cannot write to {tmp}/run/config.json: File exists",
    ),
}


@pytest.mark.parametrize("case", ERRORS)
def test_errors_are_one_line_and_change_nothing(case, tiny_run, tmp_path, monkeypatch, capsys):
    run_name, change, message = ERRORS[case]
    change = dict(change or {})
    monkeypatch.chdir(tmp_path)  # an empty folder: no runs/ here
    argv = [arg.format(tmp=tmp_path) for arg in change.pop("argv", [])]
    if run_name:
        argv = ["--run", str(tmp_path / run_name)] + argv
    if run_name == "run":
        copy_run(tiny_run, tmp_path / "run", without=change.pop("without", ()))
        if "config_text" in change:
            (tmp_path / "run" / "config.json").write_text(change.pop("config_text"))
        if "truncate" in change:  # the first 1,000 bytes, as a partial copy leaves a file
            damaged = tmp_path / "run" / change.pop("truncate")
            damaged.write_bytes(damaged.read_bytes()[:1000])
        if change:
            edit_config(tmp_path / "run", **change)
    before = snapshot(tmp_path)
    assert predict.main(["--n", "2", "--steps", "4"] + argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(message.format(tmp=tmp_path)), err
    assert snapshot(tmp_path) == before


def test_debug_shows_the_exception(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(cli.UserError, match="run not found"):
        predict.main(["--run", "nowhere", "--debug"])
    monkeypatch.setenv("OASIS_LDM_DEBUG", "1")
    with pytest.raises(cli.UserError, match="no runs under runs/"):
        predict.main([])


def test_sampling_precision_runs_the_networks_in_bf16_with_float32_results(tiny_run):
    """--precision mixed_bfloat16: the UNet and decoder compute in bf16, outputs stay float32
    in range, and the images are close to (not equal to) the float32 ones."""
    full = runs.load_run(tiny_run)
    half = runs.load_run(tiny_run, precision="mixed_bfloat16")
    assert (
        half.diffusion.ema_network.compute_dtype == "bfloat16" and full.diffusion.ema_network.compute_dtype == "float32"
    )
    a = runs.generate(full, 4, cfg.SamplingOptions("ddim", 5, 0.0, seed=3, batch_size=4))
    b = runs.generate(half, 4, cfg.SamplingOptions("ddim", 5, 0.0, seed=3, batch_size=4))
    assert b.images.dtype == np.float32 and b.images.min() >= -1 and b.images.max() <= 1
    difference = float(np.abs(a.images - b.images).mean())
    assert 0 < difference < 0.1, difference


def test_formats_png16_and_nifti_hold_the_decoders_output(tiny_run, loaded, tmp_path):
    """--format png png16 nifti: the 16-bit PNG reads back through dataset.py as the decoder's
    output within 1/65535, the NIfTI file loads with nibabel and shows the same image as the
    8-bit PNG (its intensities unrounded), with the seed in its header."""
    import nibabel as nib

    import dataset

    out = tmp_path / "formats"
    argv = ["--run", tiny_run, "--n", "2", "--steps", "4", "--out", str(out), "--format", "png", "png16", "nifti"]
    assert predict.main(argv) == 0
    expected = runs.generate(loaded, 2, cfg.SamplingOptions(steps=4, seed=0, batch_size=16), progress=False).images
    for i in range(2):
        back = dataset.load_image(str(out / f"sample_00{i}_16bit.png"), 16).numpy()
        assert np.abs(back - expected[i]).max() <= 1 / 65535 + 1e-6
        eight = np.asarray(Image.open(out / f"sample_00{i}.png"), np.float64)
        volume = nib.load(out / f"sample_00{i}.nii.gz")
        data = np.asarray(volume.dataobj)
        assert data.dtype == np.float32 and data.shape == (16, 16, 1)
        shown = data[:, ::-1, 0].T  # voxel (i, j) → image row H-1-j, column i
        assert np.abs(shown - eight).max() <= 0.5 + 1e-4  # the 8-bit PNG rounds the same values
        np.testing.assert_allclose(shown, (expected[i, :, :, 0] + 1) * 127.5, atol=1e-3)
        assert volume.header.get_zooms() == (1.0, 1.0, 1.0)
        assert b"seed 0" in volume.header["descrip"].tobytes()
    # A later call with fewer formats removes the files of the others: only this call's samples stay.
    assert predict.main(argv[:-2]) == 0  # --format png
    assert sorted(p for p in os.listdir(out) if p.startswith("sample_")) == ["sample_000.png", "sample_001.png"]
