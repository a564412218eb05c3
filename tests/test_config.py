"""config.py: presets, JSON round trip, flags generated from the dataclasses, validation."""

import argparse
import dataclasses
import json

import pytest

import config as cfg


def parse(preset_name, argv):
    parser = argparse.ArgumentParser()
    cfg.add_config_arguments(parser, cfg.preset(preset_name))
    return cfg.config_from_args(parser.parse_args(argv), preset_name)


def test_every_field_becomes_a_flag_with_help():
    parser = argparse.ArgumentParser()
    cfg.add_config_arguments(parser, cfg.preset("demo"))
    flags = {a.dest: a for a in parser._actions}
    for section in cfg.SECTIONS.values():
        for f in dataclasses.fields(section):
            assert f.name in flags, f.name
            assert flags[f.name].help and "default" in flags[f.name].help
    text = parser.format_help()  # what --help prints: argparse %-formats every help line
    assert "cosine decay to 5 % of the rate" in text and "--attn-from-level" in text


def test_flags_default_to_the_preset_and_override_it():
    seed = parse("seed", [])
    assert seed == cfg.preset("seed")
    assert seed.diffusion.timesteps == 200 and seed.autoencoder.latent_channels == 1
    changed = parse("seed", ["--image-size", "96", "--no-flip", "--unet-dim-mults", "1", "2", "--lr", "3e-4"])
    assert changed.data.image_size == 96 and changed.data.flip is False
    assert changed.unet.unet_dim_mults == (1, 2)
    assert changed.train.lr == pytest.approx(3e-4)


def test_seed_preset_has_the_original_sizes():
    seed = cfg.preset("seed")
    assert seed.data.image_size == 128 and seed.latent_size == 32
    assert seed.unet_kwargs()["dim"] == 64 and seed.unet_kwargs()["dim_mults"] == (1, 2, 4, 8)
    assert seed.unet_kwargs()["channels"] == 1
    assert (seed.diffusion.beta_start, seed.diffusion.beta_end) == (1e-4, 0.02)
    assert seed.train.batch_size == 64 and seed.train.lr == 1e-4


def test_seed_preset_uses_the_original_layouts():
    seed = cfg.preset("seed")
    assert seed.unet.unet_layout == "original" and "layout" not in seed.unet_kwargs()
    ae = seed.autoencoder_kwargs()
    assert ae["layout"] == "original" and (ae["norm"], ae["activation"], ae["latent_channels"]) == ("batch", "silu", 1)
    assert ae["base_channels"] * ae["channel_mults"][-1] == 256  # the original encoder's width
    for name in ("demo", "oasis"):
        other = cfg.preset(name)
        assert (other.unet.unet_layout, other.autoencoder.ae_layout) == ("project", "project")
    changed = parse("seed", ["--unet-layout", "project"])
    assert changed.unet.unet_layout == "project" and changed.autoencoder_kwargs()["layout"] == "original"
    with pytest.raises(SystemExit):
        parse("seed", ["--ae-layout", "lucid"])


def test_config_json_without_layout_keys_loads_the_project_layouts(tmp_path):
    """config.json files written before the layout options existed rebuild what they trained."""
    raw = cfg.to_dict(cfg.preset("seed"))
    del raw["unet"]["unet_layout"], raw["autoencoder"]["ae_layout"]
    path = tmp_path / "config.json"
    path.write_text(json.dumps(raw))
    old = cfg.load_config(path)
    assert (old.unet.unet_layout, old.autoencoder.ae_layout) == ("project", "project")
    assert old.unet.unet_layout == old.autoencoder_kwargs()["layout"] == "project"
    expected = cfg.preset("seed")
    expected.unet.unet_layout = expected.autoencoder.ae_layout = "project"
    assert old == expected  # nothing else changed


def test_config_json_of_an_older_run_keeps_how_it_trained():
    """A demo config.json written before augmentation, the L1+SSIM loss, the cosine schedule and
    Min-SNR existed resumes without them (ADDED_SETTINGS), not with today's defaults; written
    with them, they round-trip."""
    raw = cfg.to_dict(cfg.preset("demo"))
    for section, keys in cfg.ADDED_SETTINGS.items():
        for key in keys:
            del raw[section][key]
    old = cfg.from_dict(raw)
    assert (old.data.augment, old.diffusion.min_snr_gamma, old.diffusion.prediction) == (False, 0.0, "eps")
    assert (old.train.ae_loss, old.train.lr_schedule) == ("mse", "constant")
    new = cfg.preset("demo")
    new.train.lr_schedule, new.diffusion.min_snr_gamma = "cosine", 3.0  # not defaults: round-trip them too
    new.diffusion.prediction = "v"
    assert cfg.from_dict(cfg.to_dict(new)) == new
    new = cfg.preset("demo")
    assert (new.data.augment, new.diffusion.min_snr_gamma, new.train.ae_loss, new.train.lr_schedule) == (
        True,
        5.0,
        "l1_ssim",
        "constant",
    )
    assert cfg.from_dict(cfg.to_dict(new)) == new


def test_layout_choices_match_the_modules():
    import autoencoder

    assert cfg.LAYOUTS == autoencoder.LAYOUTS
    for cls, name in ((cfg.UNetConfig, "unet_layout"), (cfg.AutoencoderConfig, "ae_layout")):
        field = next(f for f in dataclasses.fields(cls) if f.name == name)
        assert field.metadata["choices"] == autoencoder.LAYOUTS and field.default == "project"


def test_seed_preset_builds_the_original_networks():
    """runs.build_* on the seed preset (at 64×64 images: 16×16 latents, to keep it fast)."""
    import runs
    from autoencoder import ResidualBlock

    seed = cfg.preset("seed")
    seed.data.image_size = 64
    ae = runs.build_autoencoder(seed)
    assert ae.layout == "original"
    assert {b.convs for b in ae.encoder.layers if isinstance(b, ResidualBlock)} == {1}
    diffusion = runs.build_diffusion(seed)
    assert diffusion.network.layout == diffusion.ema_network.layout == "original"
    assert len(diffusion.network.up_levels) == 3 and diffusion.network.init_conv.filters == 42


def test_linear_betas_scale_with_T_unless_set():
    """DDPM's 1e-4 → 0.02 was made for T = 1000: by default it is scaled by 1000 / T (so T = 200
    ends at β = 0.1 and ᾱ_{T-1} ≈ 4e-5 rather than 0.13); explicit values and the seed preset win."""
    assert parse("demo", []).diffusion.beta_range() == pytest.approx((1e-4, 0.02))
    assert parse("demo", ["--timesteps", "200"]).diffusion.beta_range() == pytest.approx((5e-4, 0.1))
    assert parse("demo", ["--timesteps", "10"]).diffusion.beta_range() == pytest.approx((0.01, 0.999))  # capped
    assert parse("demo", ["--timesteps", "200", "--beta-end", "0.05"]).diffusion.beta_range() == pytest.approx(
        (5e-4, 0.05)
    )
    assert cfg.preset("seed").diffusion.beta_range() == (1e-4, 0.02)
    with pytest.raises(ValueError, match="--beta-start and --beta-end need 0 < start <= end < 1, got 0.1 and 0.05"):
        parse("demo", ["--schedule", "linear", "--beta-start", "0.1", "--beta-end", "0.05"]).validate()


def test_json_round_trip(tmp_path):
    config = parse("oasis", ["--timesteps", "50"])
    config.scale_factor = 0.8125
    path = tmp_path / "config.json"
    cfg.save_config(config, path)
    assert cfg.load_config(path) == config
    assert json.loads(path.read_text())["unet"]["unet_dim_mults"] == [1, 2, 4, 8]
    assert not list(tmp_path.glob("*.tmp"))


def test_unknown_keys_are_refused(tmp_path):
    raw = cfg.to_dict(cfg.preset("demo"))
    raw["unet"]["wings"] = 2
    with pytest.raises(ValueError, match="unknown keys: wings"):
        cfg.from_dict(raw)


def test_autoencoder_batch_size_defaults_to_the_batch_size():
    """--ae-batch-size None (and a config.json from before it) trains the autoencoder at --batch-size."""
    demo = cfg.preset("demo")
    assert (demo.train.batch_size, demo.train.ae_batch_size, demo.train.autoencoder_batch_size) == (16, 4, 4)
    assert parse("demo", ["--ae-batch-size", "8"]).train.autoencoder_batch_size == 8
    raw = cfg.to_dict(cfg.preset("oasis"))
    del raw["train"]["ae_batch_size"]
    old = cfg.from_dict(raw)
    assert old.train.ae_batch_size is None and old.train.autoencoder_batch_size == old.train.batch_size == 64
    assert old == cfg.preset("oasis")


def test_mask_input_channels_and_older_mask_runs():
    """A mask run's UNet takes 4 f² channels (pixels, the default) or 4 (area); config.json files
    of mask runs made before `mask_input` existed trained on the area shares."""
    demo = cfg.preset("demo")  # 64 px images, 16 × 16 latents: f = 4
    assert (demo.condition.mask_input, demo.mask_channels) == ("pixels", 64)
    assert parse("demo", ["--mask-input", "area"]).mask_channels == 4
    assert parse("demo", ["--condition", "slice"]).mask_channels == 0
    raw = cfg.to_dict(demo)
    del raw["condition"]["mask_input"], raw["condition"]["mask_dropout"]
    old = cfg.from_dict(raw)
    assert (old.condition.mask_input, old.mask_channels) == ("area", 4)
    assert old.condition.mask_dropout is None  # the mask drops at --cond-dropout's rate, as it did


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset 'big'"):
        cfg.preset("big")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--image-size", "60"], "must be divisible by 16"),
        (["--batch-size", "0"], "--batch-size must be positive"),
        (["--ae-batch-size", "0"], "--ae-batch-size must be positive, got 0"),
        (["--mask-dropout", "1.5"], r"--mask-dropout must be in \[0, 1\], got 1.5"),
        (["--ldm-epochs", "-1"], "--ldm-epochs must be positive"),
        (["--lr", "0"], "--lr must be positive"),
        (["--unet-groups", "7"], "--unet-groups 7 must divide"),
        (["--attn-from-level", "-1"], r"--attn-from-level must be 0 \(every level\) or more, got -1"),
    ],
)
def test_validate_rejects(argv, message):
    with pytest.raises(ValueError, match=message):
        parse("demo", argv).validate()


def test_presets_validate():
    for name in cfg.PRESETS:
        cfg.preset(name).validate()


def test_explicit_flags():
    assert cfg.explicit_flags(["--ldm-epochs", "4", "--no-xla", "--lr=1e-3", "x"]) == {"ldm_epochs", "xla", "lr"}


def test_activation_choices_match_the_autoencoder():
    import autoencoder

    field = next(f for f in dataclasses.fields(cfg.AutoencoderConfig) if f.name == "ae_activation")
    assert field.metadata["choices"] == autoencoder.AUTOENCODER_ACTIVATIONS


def test_an_old_config_with_a_boolean_xla_loads(tmp_path):
    """Runs made before `--xla auto` saved xla as true/false."""
    raw = cfg.to_dict(cfg.preset("demo"))
    for old, new in ((True, "on"), (False, "off")):
        raw["train"]["xla"] = old
        assert cfg.from_dict(raw).train.xla == new
