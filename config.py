"""Run configuration: dataclasses, presets, JSON save/load and argparse generated from them.

A run is described by one `RunConfig`, made of small sections (data, autoencoder, UNet,
diffusion, training). Every field of every section becomes a command-line flag
(`image_size` → `--image-size`) whose default comes from the chosen preset and whose
help line is the field's `help` metadata, so a new option is added in exactly one place.

Presets:
    demo   small networks at 64×64 for a 2-core CPU: about ten minutes on the demo data set,
           conditioned on the slice position and the tissue mask (the dataclass defaults
           below, with the changes `_preset_demo` lists and says why).
    oasis  the original design's sizes at 128×128, meant for a GPU and the OASIS slices.
    seed   exactly the original design: 128×128, its networks (layout "original"): the
           autoencoder's one-conv residual blocks with BatchNorm and SiLU, 256 channels wide,
           a 1-channel 32×32 latent, decoder 256 → 128 → 64 → 1 (3.5 M parameters); its UNet,
           dim 64 × (1, 2, 4, 8) with one skip per level (32.3 M); T = 200 linear steps with
           the unscaled β 1e-4 → 0.02, batch 64. `--ae-layout` / `--unet-layout project`
           swap in this project's wiring at the same sizes.

`config.json` in a run directory is `RunConfig` as JSON, including the latent scale
factor once stage 1 has measured it: it is all that is needed to rebuild the models.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import types
import typing
from dataclasses import dataclass, field

# The choices of the flags, defined here once; autoencoder.py, diffusion.py and samplers.py check
# their arguments against the same tuples.
PRECISIONS = ("auto", "float32", "mixed_bfloat16", "mixed_float16")
LAYOUTS = ("project", "original")  # network wiring: this project's, or the original design's
AUTOENCODER_NORMS = ("batch", "group")
AUTOENCODER_ACTIVATIONS = ("relu", "silu", "gelu", "elu", "leaky_relu")
SCHEDULES = ("linear", "cosine")
PREDICTIONS = ("eps", "v")  # what the UNet predicts: the noise, or v (diffusion.py, "Parameterization")
SAMPLERS = ("ddim", "ddpm", "dpmpp")
STRATEGIES = ("auto", "default", "mirrored", "multiworker")
STAGES = ("all", "ae", "ldm")
XLA_SETTINGS = ("auto", "on", "off")
AE_LOSSES = ("mse", "l1", "l1_ssim")
LR_SCHEDULES = ("constant", "cosine")
MASK_INPUTS = ("pixels", "area")  # how the UNet sees a tissue mask: masks.mask_input
# `--condition mask`: the UNet sees the image's tissue mask (masks.py) instead of a label column.
MASK = "mask"
MASK_CLASSES = 4  # masks.CLASS_NAMES: background, CSF, grey matter, white matter


def option(default, help, **extra):
    """A dataclass field with a help line (argparse reads it from `metadata`)."""
    if isinstance(default, (list, tuple)):
        return field(default_factory=lambda: tuple(default), metadata={"help": help, **extra})
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class DataConfig:
    data: str | None = option(None, "folder of PNG slices (OASIS layout or flat); default: the demo data set")
    image_size: int = option(64, "images are resized to image_size × image_size")
    flip: bool = option(True, "random left-right flips (autoencoder) and flipped copies of the latents")
    augment: bool = option(
        True,
        "autoencoder stage: random small rotations, scalings and shifts and intensity gain and gamma of the "
        "training images (dataset.Augmentation); the diffusion stage learns the unchanged images",
    )


@dataclass
class AutoencoderConfig:
    ae_base_channels: int = option(16, "autoencoder width at full resolution")
    ae_channel_mults: tuple[int, ...] = option((1, 2, 4), "width multipliers per level; 3 levels = downsample ×4")
    ae_blocks_per_level: int = option(1, "residual blocks per autoencoder level")
    latent_channels: int = option(4, "channels of the latent (the original: 1)")
    ae_norm: str = option("group", "autoencoder normalisation (the original: batch)", choices=AUTOENCODER_NORMS)
    ae_activation: str = option("relu", "autoencoder activation", choices=AUTOENCODER_ACTIVATIONS)
    ae_layout: str = option(
        "project",
        "autoencoder wiring: project (two-conv blocks, widening encoder) or original (the original design's "
        "one-conv blocks, encoder at the widest width throughout)",
        choices=LAYOUTS,
    )


@dataclass
class UNetConfig:
    unet_dim: int = option(32, "UNet base width")
    unet_dim_mults: tuple[int, ...] = option((1, 2, 4), "UNet width multipliers per level")
    unet_groups: int = option(8, "GroupNorm groups in the UNet's ResNet blocks")
    attn_heads: int = option(4, "attention heads")
    attn_dim_head: int = option(32, "width of one attention head")
    attn_from_level: int = option(
        0,
        "the first UNet level (0: the latent's resolution) with linear attention; the levels above it have none "
        "(the number of levels or more: no level has)",
    )
    unet_layout: str = option(
        "project",
        "UNet wiring: project (two skips per level, widths change at the downsampling) or original (the "
        "original design's: one skip per level, widths change in the level's first block)",
        choices=LAYOUTS,
    )


@dataclass
class DiffusionConfig:
    timesteps: int = option(1000, "diffusion steps T")
    schedule: str = option("linear", "noise schedule", choices=SCHEDULES)
    beta_start: float | None = option(None, "linear schedule: first β; None: 1e-4 × 1000/T")
    beta_end: float | None = option(None, "linear schedule: last β; None: 0.02 × 1000/T (at most 0.999)")
    ema_decay: float = option(0.999, "decay of the UNet's exponential moving average (used for sampling)")
    min_snr_gamma: float = option(
        0.0,
        "Min-SNR-γ loss weighting (Hang et al. 2023): each example's ε-MSE × min(SNR_t, γ) / SNR_t; 0: the plain ε-MSE",
    )
    prediction: str = option(
        "eps",
        "what the UNet predicts: eps (the noise) or v = sqrt(ᾱ_t) ε − sqrt(1 − ᾱ_t) x_0 (Salimans & Ho 2022), whose "
        "clean-image estimate stays bounded near pure noise; the loss is the same (Min-SNR-)weighted ε-MSE",
        choices=PREDICTIONS,
    )

    def beta_range(self) -> tuple[float, float]:
        """(first, last) β of the linear schedule: as set, or DDPM's 1e-4 → 0.02 (made for
        T = 1000) scaled by 1000 / T, as improved-diffusion does, so that the terminal
        ᾱ_{T-1} ≈ 4e-5 whatever T and training sees (nearly) the N(0, I) that sampling
        starts from. Unscaled, T = 200 would end at ᾱ = 0.13 (`--preset seed` keeps that)."""
        scale = 1000.0 / self.timesteps
        start = 1e-4 * scale if self.beta_start is None else self.beta_start
        end = min(0.02 * scale, 0.999) if self.beta_end is None else self.beta_end
        return start, end


def parse_condition_names(text: str) -> tuple[str, ...]:
    """--condition's value: "slice,age" → ("slice", "age"); "" or "none" → () (unconditional).
    An argparse type: a name given twice is an ArgumentTypeError (a one-line usage error)."""
    if text.strip().lower() in ("", "none"):
        return ()
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise argparse.ArgumentTypeError(f"condition variable {repeated[0]!r} is named twice")
    return names


@dataclass
class ConditionConfig:
    condition: tuple[str, ...] = option(
        (),
        "what to condition the UNet on, comma-separated: label variables (e.g. slice,age,sex,cdr; columns of the "
        "data's labels.csv) and/or mask (the tissue mask beside each image); none: unconditional",
        parse=parse_condition_names,
    )
    cond_dropout: float = option(
        0.1, "classifier-free guidance training: probability of replacing each condition by 'unknown'"
    )
    mask_dropout: float | None = option(
        None,
        "classifier-free guidance training: probability of replacing the tissue mask by 'unknown' (all "
        "zeros), drawn apart from the labels'; None: --cond-dropout",
    )
    uncond_dropout: float = option(
        0.0,
        "classifier-free guidance training: probability of replacing every condition and the tissue mask of an "
        "example by 'unknown' at once, on top of the drops above (which alone leave that case rare)",
    )
    mask_input: str = option(
        "pixels",
        "how the UNet sees the tissue mask at the latent's resolution: pixels (each latent cell holds the "
        "one-hot classes of all its f × f image pixels, ÷ f²: 4 f² channels) or area (each class's share of "
        "the cell: 4 channels)",
        choices=MASK_INPUTS,
    )


@dataclass
class TrainConfig:
    out: str = option("runs/demo", "run directory (refused if it holds a run, unless --resume)")
    stage: str = option("all", "what to train: ae, ldm (needs a trained autoencoder in --out) or all", choices=STAGES)
    ae_epochs: int = option(10, "autoencoder epochs")
    ae_steps_per_epoch: int = option(
        50, "autoencoder steps per epoch (0: one pass over the data, rounded down to whole --steps-per-execution)"
    )
    ae_lr: float = option(1e-3, "autoencoder learning rate (Adam)")
    ae_loss: str = option(
        "l1_ssim",
        "autoencoder loss on [0, 1]: mse, l1, or l1_ssim = 0.16 L1 + 0.84 (1 − SSIM) (Zhao et al. 2017)",
        choices=AE_LOSSES,
    )
    mask_decoder_steps: int = option(
        300,
        "steps of the mask decoder (latent -> tissue mask, so a sample decodes to an image + mask pair), trained "
        "after the autoencoder at the autoencoder's batch size when the data has masks (the demo preset: 500); "
        "0: none",
    )
    spade_decoder_steps: int = option(
        100,
        "steps of the SPADE decoder (the image decoder also given the tissue mask, which decodes the images "
        "generated for a mask: spade.py), fine-tuned from the decoder after the autoencoder at its batch size when "
        "the run is conditioned on the mask; 0: none (the plain decoder decodes them)",
    )
    ldm_epochs: int = option(20, "diffusion epochs")
    ldm_steps_per_epoch: int = option(
        100, "diffusion steps per epoch (0: one pass over the latents, rounded down to whole --steps-per-execution)"
    )
    lr: float = option(5e-4, "diffusion learning rate (Adam)")
    lr_schedule: str = option(
        "constant",
        "the diffusion stage's learning rate: constant, or cosine (linear warm-up over the first 5 % of the "
        "stage's steps, then cosine decay to 5 % of the rate at its last step)",
        choices=LR_SCHEDULES,
    )
    ae_lr_schedule: str | None = option(
        None,
        "the autoencoder's learning-rate schedule, as --lr-schedule; None: --lr-schedule's",
        choices=LR_SCHEDULES,
    )
    batch_size: int = option(16, "global batch size (split across devices)")
    ae_batch_size: int | None = option(
        None,
        "the autoencoder's global batch size; None: --batch-size (the demo preset: 4, for more, smaller steps "
        "in the same time on a CPU)",
    )
    scale_with_replicas: bool = option(
        False,
        "a fresh run on several replicas: global batch = --batch-size × replicas, learning rates × "
        "sqrt(replicas) (config.json records the scaled values)",
    )
    precision: str = option(
        "auto",
        "compute precision, variables stay float32; auto: on a GPU mixed_bfloat16 from compute capability "
        "8.0 (A100, H100, RTX 30xx and newer), mixed_float16 on 7.x (V100, T4, RTX 20xx), float32 below; on a "
        "CPU mixed_bfloat16 with AMX, else float32 (also with AVX512-BF16 but no AMX: too little gain). A resume "
        "keeps the optimizer "
        "kind: a mixed_float16 run (loss scaling) resumes only in mixed_float16, any other only in another",
        choices=PRECISIONS,
    )
    xla: str = option(
        "auto",
        "compile train steps with XLA (jit_compile); never with more than one replica; auto: on with one "
        "GPU, and on a CPU-only machine whose TensorFlow runs without oneDNN (AVX2 CPUs) in float32; off elsewhere",
        choices=XLA_SETTINGS,
    )
    steps_per_execution: int = option(
        32,
        "train steps per call into TensorFlow (Keras' steps_per_execution): the losses are read back once per "
        "call, not every step; at most a divisor of given steps per epoch (a one-pass epoch is rounded down to "
        "whole calls); 1 under --strategy mirrored/multiworker (a Keras bug)",
    )
    checkpoint_minutes: float = option(
        5.0,
        "save a checkpoint at the end of the first epoch that ends this many minutes after the last one, "
        "and after a stage's last epoch (0: every epoch); --resume continues from the last one",
    )
    strategy: str = option(
        "auto",
        "tf.distribute: auto (mirrored if >1 GPU), default, mirrored, multiworker (TF_CONFIG)",
        choices=STRATEGIES,
    )
    worker_timeout: int = option(
        0,
        "multiworker: seconds a collective operation may wait for the other workers (0: no limit). A worker "
        "that dies breaks its connections, which ends the others with one error line either way; a limit "
        "catches one that hangs, but TensorFlow starts a thread per collective for it (a debugging aid: "
        "thousands at GPU speed), so set it only to find a hang",
    )
    sample_every: int = option(5, "log a few samples to TensorBoard every N diffusion epochs (0: never)")
    keep_checkpoints: int = option(3, "how many of the newest checkpoints to keep")
    seed: int = option(0, "random seed for data order, initialisation, t and ε")
    deterministic: bool = option(
        False,
        "TensorFlow op determinism: the same seed gives the same weights bit for bit, interrupted and "
        "resumed or not (slower); on a GPU TensorFlow then uses deterministic cuDNN kernels and raises for an "
        "op that has none; the bitwise claim is tested on CPU only",
    )

    @property
    def autoencoder_batch_size(self) -> int:
        """The autoencoder stage's global batch: `ae_batch_size`, or `batch_size` when None (also
        what runs made before `ae_batch_size` existed trained with)."""
        return self.batch_size if self.ae_batch_size is None else self.ae_batch_size

    @property
    def autoencoder_lr_schedule(self) -> str:
        """The autoencoder stage's schedule: `ae_lr_schedule`, or `lr_schedule` when None."""
        return self.lr_schedule if self.ae_lr_schedule is None else self.ae_lr_schedule


SECTIONS = {
    "data": DataConfig,
    "autoencoder": AutoencoderConfig,
    "unet": UNetConfig,
    "diffusion": DiffusionConfig,
    "condition": ConditionConfig,
    "train": TrainConfig,
}


@dataclass
class RunConfig:
    """Everything that defines a run.

    Measured by train.py and recorded with the settings: `scale_factor`, 1 / std of the
    training latents after stage 1 (samplers divide by it before decoding);
    `latent_max_abs`, the largest |latent × scale_factor| of the training set (samplers
    clip their x0 estimate to ± it); `terminal_alpha_bar`, ᾱ_{T-1} of the noise schedule
    (how close the last noising step gets to the N(0, I) that sampling starts from);
    `condition_stats`, per label variable its training-split statistics
    (conditioning.condition_stats), in the order of `condition.condition` (`label_conditions`:
    the tissue mask, `MASK`, has none).
    """

    preset: str = "demo"
    data: DataConfig = field(default_factory=DataConfig)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    condition: ConditionConfig = field(default_factory=ConditionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    scale_factor: float | None = None
    latent_max_abs: float | None = None
    terminal_alpha_bar: float | None = None
    condition_stats: dict | None = None

    def autoencoder_kwargs(self) -> dict:
        """Constructor arguments of `autoencoder.AutoEncoder`."""
        a = self.autoencoder
        return dict(
            image_channels=1,
            base_channels=a.ae_base_channels,
            channel_mults=tuple(a.ae_channel_mults),
            blocks_per_level=a.ae_blocks_per_level,
            latent_channels=a.latent_channels,
            norm=a.ae_norm,
            activation=a.ae_activation,
            layout=a.ae_layout,
        )

    def unet_kwargs(self) -> dict:
        """Constructor arguments of `modules.UNet`, or of `modules.OriginalUNet` where
        `unet.unet_layout` is "original" (the layout picks the class, so it is not among them)."""
        u = self.unet
        return dict(
            dim=u.unet_dim,
            dim_mults=tuple(u.unet_dim_mults),
            channels=self.autoencoder.latent_channels,
            resnet_groups=u.unet_groups,
            attn_heads=u.attn_heads,
            attn_dim_head=u.attn_dim_head,
            attn_from_level=u.attn_from_level,
            cond_categories=self.cond_categories(),
            mask_channels=self.mask_channels,
        )

    def cond_categories(self) -> tuple[int, ...]:
        """UNet's cond_categories: per label variable its category count, 0 if continuous."""
        if self.label_conditions and self.condition_stats is None:
            raise ValueError("the condition statistics are not measured yet (condition_stats)")
        return tuple(len(s["categories"]) if s["categories"] else 0 for s in (self.condition_stats or {}).values())

    @property
    def label_conditions(self) -> tuple[str, ...]:
        """The label variables of `condition.condition` (all but `MASK`): what `condition_stats` covers."""
        return tuple(name for name in self.condition.condition if name != MASK)

    @property
    def mask_channels(self) -> int:
        """The UNet's mask_channels: the channels of `masks.mask_input` for a run conditioned on the
        tissue mask (`MASK_CLASSES`, × f² for `mask_input` pixels), else 0."""
        if MASK not in self.condition.condition:
            return 0
        cell = self.data.image_size // self.latent_size
        return MASK_CLASSES * (cell * cell if self.condition.mask_input == "pixels" else 1)

    @property
    def latent_size(self) -> int:
        """Side of the square latent: image_size / 2^(autoencoder levels − 1)."""
        return self.data.image_size // 2 ** (len(self.autoencoder.ae_channel_mults) - 1)

    def validate(self) -> None:
        """Raise ValueError with one readable line for a configuration that cannot train."""
        positive = {
            "ae_epochs": self.train.ae_epochs,
            "ldm_epochs": self.train.ldm_epochs,
            "batch_size": self.train.batch_size,
            "ae_batch_size": self.train.autoencoder_batch_size,
            "lr": self.train.lr,
            "ae_lr": self.train.ae_lr,
            "timesteps": self.diffusion.timesteps,
            "steps_per_execution": self.train.steps_per_execution,
        }
        for name, value in positive.items():
            if value <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {value}")
        if self.train.worker_timeout < 0:
            raise ValueError(f"--worker-timeout must be 0 (no limit) or more, got {self.train.worker_timeout}")
        if self.train.checkpoint_minutes < 0:
            raise ValueError(f"--checkpoint-minutes must be 0 or more, got {self.train.checkpoint_minutes}")
        size = self.data.image_size
        ae_factor = 2 ** (len(self.autoencoder.ae_channel_mults) - 1)
        unet_factor = 2 ** (len(self.unet.unet_dim_mults) - 1)
        if size <= 0 or size % (ae_factor * unet_factor):
            raise ValueError(
                f"--image-size {size} must be divisible by {ae_factor * unet_factor} "
                f"(autoencoder ×{ae_factor}, then {len(self.unet.unet_dim_mults)} UNet levels ×{unet_factor})"
            )
        if self.diffusion.schedule == "linear":
            start, end = self.diffusion.beta_range()
            if not 0.0 < start <= end < 1.0:
                raise ValueError(f"--beta-start and --beta-end need 0 < start <= end < 1, got {start:g} and {end:g}")
        if self.diffusion.min_snr_gamma < 0:
            raise ValueError(f"--min-snr-gamma must be 0 (off) or more, got {self.diffusion.min_snr_gamma}")
        if not 0.0 <= self.condition.cond_dropout <= 1.0:
            raise ValueError(f"--cond-dropout must be in [0, 1], got {self.condition.cond_dropout}")
        if self.condition.mask_dropout is not None and not 0.0 <= self.condition.mask_dropout <= 1.0:
            raise ValueError(f"--mask-dropout must be in [0, 1], got {self.condition.mask_dropout}")
        if not 0.0 <= self.condition.uncond_dropout <= 1.0:
            raise ValueError(f"--uncond-dropout must be in [0, 1], got {self.condition.uncond_dropout}")
        if self.unet.attn_from_level < 0:
            raise ValueError(f"--attn-from-level must be 0 (every level) or more, got {self.unet.attn_from_level}")
        width = self.unet.unet_dim
        if any((width * m) % self.unet.unet_groups for m in self.unet.unet_dim_mults):
            raise ValueError(f"--unet-groups {self.unet.unet_groups} must divide every UNet width {width}×mult")


def _preset_demo() -> RunConfig:
    # Min-SNR-γ weighting (Hang et al. 2023): measured on the demo against the plain ε-MSE in
    # BENCHMARKS.md, "The demo end to end". The cosine noise schedule at a rate of 2e-3: the masks
    # are followed better than with the linear one at 1e-3, at the same cost ("The demo's noise
    # schedule and rate"). Linear attention at the 4×4 level only: faster steps that learn more
    # per step here ("The demo UNet's attention"). Conditioned on the slice position and the
    # tissue mask (the demo set ships masks), so one demo run shows both; the mask dropped 70 % of
    # the time (the slice 10 %), so the slice alone is trained on 63 % of the examples, not 9 %: it
    # is followed better, the mask a little less ("The mask's dropout, given the SPADE decoder").
    # The autoencoder and the mask decoder at batch 4: more, smaller steps learn more per CPU
    # second ("The demo autoencoder's batch"). No TensorBoard samples: `make demo` runs
    # predict.py right after training, which draws them.
    return RunConfig(
        preset="demo",
        unet=UNetConfig(attn_from_level=2),
        diffusion=DiffusionConfig(schedule="cosine", min_snr_gamma=5.0),
        condition=ConditionConfig(condition=("slice", MASK), mask_dropout=0.7),
        train=TrainConfig(
            ldm_epochs=15,
            lr=2e-3,
            ae_batch_size=4,
            ae_steps_per_epoch=200,
            ae_lr_schedule="cosine",
            mask_decoder_steps=500,
            sample_every=0,
        ),
    )


def _preset_oasis() -> RunConfig:
    return RunConfig(
        preset="oasis",
        data=DataConfig(image_size=128),
        autoencoder=AutoencoderConfig(
            ae_base_channels=64, ae_channel_mults=(1, 2, 4), ae_blocks_per_level=2, latent_channels=4, ae_norm="group"
        ),
        unet=UNetConfig(unet_dim=64, unet_dim_mults=(1, 2, 4, 8)),
        diffusion=DiffusionConfig(timesteps=1000, min_snr_gamma=5.0),
        train=TrainConfig(
            out="runs/oasis",
            ae_epochs=30,
            ae_steps_per_epoch=0,
            ldm_epochs=200,
            ldm_steps_per_epoch=0,
            batch_size=64,
            ae_lr=1e-3,
            lr=1e-4,
        ),
    )


def _preset_seed() -> RunConfig:
    return RunConfig(
        preset="seed",
        data=DataConfig(image_size=128, flip=False, augment=False),
        # The original's networks: layout "original" (autoencoder.AutoEncoder, modules.OriginalUNet). Base 64 ×
        # mults (1, 2, 4) makes the encoder 256 wide throughout and the decoder 256 → 128 → 64.
        autoencoder=AutoencoderConfig(
            ae_base_channels=64,
            ae_channel_mults=(1, 2, 4),
            ae_blocks_per_level=1,
            latent_channels=1,
            ae_norm="batch",
            ae_activation="silu",
            ae_layout="original",
        ),
        unet=UNetConfig(unet_dim=64, unet_dim_mults=(1, 2, 4, 8), unet_layout="original"),
        diffusion=DiffusionConfig(timesteps=200, beta_start=1e-4, beta_end=0.02, min_snr_gamma=0.0),
        train=TrainConfig(
            out="runs/seed",
            ae_epochs=30,
            ae_steps_per_epoch=0,
            ldm_epochs=100,
            ldm_steps_per_epoch=0,
            batch_size=64,
            ae_lr=1e-3,
            lr=1e-4,
            ae_loss="mse",
            lr_schedule="constant",
            precision="float32",
        ),
    )


PRESETS = {"demo": _preset_demo, "oasis": _preset_oasis, "seed": _preset_seed}


def preset(name: str) -> RunConfig:
    """A fresh `RunConfig` for a preset name; ValueError for an unknown one."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]()


# ---------------------------------------------------------------------------- sampling

# Network evaluations per sample when --steps is not given (T when the run has fewer; DDPM always runs T).
DEFAULT_STEPS = {"ddim": 50, "dpmpp": 20}


@dataclass(frozen=True)
class SamplingOptions:
    """How to sample a trained run: one bundle, built once from predict.py's or evaluate.py's
    flags (`cli.sampling_options`) and passed down to `runs.generate` and the samplers.

    `steps` None means the sampler's `DEFAULT_STEPS` capped at the run's T (`resolved`).
    """

    sampler: str = option(
        "ddim", "ddim, dpmpp (DPM-Solver++(2M), deterministic) or ddpm (all T steps)", choices=SAMPLERS
    )
    steps: int | None = option(
        None, "DDIM or DPM-Solver++ steps, in [1, T]; not given: 50 for DDIM, 20 for DPM-Solver++, T if smaller"
    )
    eta: float = option(0.0, "DDIM noise: 0 deterministic, 1 DDPM-like")
    seed: int = option(0, "the same seed and batch size give the same images")
    batch_size: int = option(16, "samples per sampler call")
    guidance: float = option(3.0, "classifier-free guidance weight w of eps_u + w (eps_c - eps_u) (conditioned runs)")

    def resolved(self, timesteps: int) -> SamplingOptions:
        """These options with `steps` filled in for a run of `timesteps` T (see the class docstring)."""
        if self.steps is not None:
            return self
        return dataclasses.replace(self, steps=min(DEFAULT_STEPS.get(self.sampler, DEFAULT_STEPS["ddim"]), timesteps))

    def network_evaluations(self, timesteps: int) -> int:
        """UNet calls per sample (per guided pair): DDIM's and DPM-Solver++'s `steps`, DDPM's T."""
        return timesteps if self.sampler == "ddpm" else self.resolved(timesteps).steps

    def label(self, timesteps: int) -> str:
        """E.g. "DDIM 50 steps, eta 0", "DPM-Solver++(2M) 20 steps" or "DDPM 1000 steps", for titles and tables."""
        steps = self.network_evaluations(timesteps)
        if self.sampler == "ddim":
            return f"DDIM {steps} steps, eta {self.eta:g}"
        if self.sampler == "dpmpp":
            return f"DPM-Solver++(2M) {steps} steps"
        return f"DDPM {steps} steps"

    def validate(self, timesteps: int, n: int = 1) -> None:
        """Raise ValueError (one line, in the flags' words) for options a run of T `timesteps` cannot honour."""
        if self.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r}; choose one of {', '.join(SAMPLERS)}")
        if n < 1 or self.batch_size < 1:
            raise ValueError(f"--n and --batch-size must be positive, got {n} and {self.batch_size}")
        steps = self.resolved(timesteps).steps
        if self.sampler != "ddpm" and not 1 <= steps <= timesteps:
            raise ValueError(f"--steps must be in [1, {timesteps}] (the run's T), got {steps}")
        if self.eta < 0:
            raise ValueError(f"--eta must be >= 0, got {self.eta}")
        if self.eta and self.sampler != "ddim":
            raise ValueError(f"--eta applies to the ddim sampler only, got --eta {self.eta:g} with {self.sampler}")
        if self.seed < 0:
            raise ValueError(f"--seed must be >= 0, got {self.seed}")


# ---------------------------------------------------------------------------- JSON


def to_dict(config: RunConfig) -> dict:
    return dataclasses.asdict(config)


# Settings added after runs were first made, with the value that reproduces how those runs
# trained: a config.json without them (an older run) gets these, not the current defaults.
ADDED_SETTINGS = {
    "data": {"augment": False},
    "condition": {"mask_input": "area", "uncond_dropout": 0.0},
    "diffusion": {"min_snr_gamma": 0.0, "prediction": "eps"},
    "train": {"ae_loss": "mse", "lr_schedule": "constant", "mask_decoder_steps": 0, "spade_decoder_steps": 0},
}


def from_dict(raw: dict) -> RunConfig:
    """Inverse of `to_dict`; unknown keys are an error (a config from another version). Keys of
    `ADDED_SETTINGS` that a config lacks get the value those older runs trained with."""
    raw = dict(raw)
    sections = {}
    for name, cls in SECTIONS.items():
        values = dict(raw.pop(name, {}))
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = set(values) - set(known)
        if unknown:
            raise ValueError(f"config section {name!r} has unknown keys: {', '.join(sorted(unknown))}")
        if values:  # a section that is there: an older run may lack the settings added since
            values = {**ADDED_SETTINGS.get(name, {}), **values}
        for key, value in values.items():
            if isinstance(value, list):
                values[key] = tuple(value)
        if isinstance(values.get("xla"), bool):  # runs made before `auto` existed: xla was a bool
            values["xla"] = "on" if values["xla"] else "off"
        sections[name] = cls(**values)
    unknown = set(raw) - {"preset", "scale_factor", "latent_max_abs", "terminal_alpha_bar", "condition_stats"}
    if unknown:
        raise ValueError(f"config has unknown keys: {', '.join(sorted(unknown))}")
    return RunConfig(**sections, **raw)


def write_json_atomic(data: dict, path: str | os.PathLike) -> None:
    """JSON (indent 2) through a temporary file renamed over `path`: a kill never leaves half
    a file. NaN/inf are refused (they are not JSON)."""
    path = os.fspath(path)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, allow_nan=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_config(config: RunConfig, path: str | os.PathLike) -> None:
    write_json_atomic(to_dict(config), path)


def load_config(path: str | os.PathLike) -> RunConfig:
    with open(path) as f:
        return from_dict(json.load(f))


# ---------------------------------------------------------------------------- argparse


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _field_type(cls, f: dataclasses.Field):
    """The concrete Python type of a field, resolving `from __future__` string annotations."""
    hints = typing.get_type_hints(cls)
    return hints[f.name]


def add_dataclass_arguments(group, cls, defaults, exclude=()) -> None:
    """Add one flag per field of the dataclass `cls` (but those named in `exclude`) to `group`
    (a parser or argument group), defaulting to the field's value in the instance `defaults`;
    help from the field's metadata."""
    for f in dataclasses.fields(cls):
        if f.name in exclude:
            continue
        default = getattr(defaults, f.name)
        kind = _field_type(cls, f)
        help_text = f"{f.metadata['help']} (default: {default})".replace("%", "%%")  # argparse %-formats help
        if kind is bool:
            group.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, default=default, help=help_text)
        elif "parse" in f.metadata:  # one token parsed by the field's own function (e.g. "slice,age")
            group.add_argument(_flag(f.name), type=f.metadata["parse"], default=default, help=help_text)
        elif typing.get_origin(kind) is tuple:
            inner = typing.get_args(kind)[0]
            group.add_argument(_flag(f.name), type=inner, nargs="+", default=default, help=help_text)
        else:
            if typing.get_origin(kind) in (typing.Union, types.UnionType):  # `str | None`
                kind = next(a for a in typing.get_args(kind) if a is not type(None))
            group.add_argument(
                _flag(f.name), type=kind, default=default, help=help_text, choices=f.metadata.get("choices")
            )


def dataclass_from_args(cls, args: argparse.Namespace):
    """An instance of the dataclass `cls` from parsed flags (every field is present in `args`)."""
    values = {}
    for f in dataclasses.fields(cls):
        value = getattr(args, f.name)
        values[f.name] = tuple(value) if isinstance(value, list) else value
    return cls(**values)


def add_config_arguments(parser: argparse.ArgumentParser, defaults: RunConfig) -> None:
    """Add one flag per config field, with the preset's value as default."""
    for section_name, cls in SECTIONS.items():
        add_dataclass_arguments(parser.add_argument_group(section_name), cls, getattr(defaults, section_name))


def config_from_args(args: argparse.Namespace, preset_name: str) -> RunConfig:
    """Build a `RunConfig` from parsed flags (every field is present in `args`)."""
    sections = {name: dataclass_from_args(cls, args) for name, cls in SECTIONS.items()}
    return RunConfig(preset=preset_name, **sections)


def explicit_flags(argv: list[str]) -> set[str]:
    """Field names the user typed on the command line (e.g. {'ldm_epochs'}), for --resume."""
    names = set()
    for token in argv:
        if token.startswith("--"):
            name = token[2:].split("=", 1)[0]
            if name.startswith("no-"):
                name = name[3:]
            names.add(name.replace("-", "_"))
    return names


def describe(config: RunConfig) -> str:
    """Settings as aligned `section.name = value` lines, printed at the start of a run."""
    lines = [f"preset = {config.preset}"] + [
        f"{name} = {getattr(config, name)}"
        for name in ("scale_factor", "latent_max_abs", "terminal_alpha_bar", "condition_stats")
    ]
    for section_name in SECTIONS:
        for key, value in dataclasses.asdict(getattr(config, section_name)).items():
            lines.append(f"{section_name}.{key} = {value}")
    return "\n".join(lines)
