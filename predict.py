"""Generate brain MRI slices with a trained run: sample latents, decode, write PNGs.

    python predict.py                                 # the newest run under runs/, 16 DDIM samples
    python predict.py --run runs/demo --n 64 --steps 100 --seed 3
    python predict.py --run demo --sampler ddpm --out /tmp/samples
    python predict.py --run demo --condition slice=0.6 --guidance 3   # a conditioned run
    python predict.py --run demo --mask seg_a.png seg_b.png           # a run conditioned on masks
    python predict.py --run demo --pairs 16                           # samples with their tissue masks

Options (`python predict.py --help`): --run RUN (a folder, or a name under runs/; default:
the run whose config.json is newest), --n 16, --sampler ddim|dpmpp|ddpm, --steps (DDIM: 50,
DPM-Solver++: 20, at most T; DDPM runs all T), --eta 0.0 (DDIM noise, 0 = deterministic),
--seed 0, --batch-size 16, --precision float32|mixed_bfloat16|mixed_float16|auto, --format
png|png16|nifti (one or more), --out DIR (default RUN/predictions), --debug (tracebacks
instead of one-line errors; or set OASIS_LDM_DEBUG=1). A run trained with --condition also
takes --condition NAME=VALUE ... (variables left out are unknown; none given: unconditional
samples), --guidance W (classifier-free guidance weight, default 3) and --sweep NAME (the
variable conditions.png sweeps; default: the first one not given with --condition). A run
trained with --condition mask takes --mask FILE ... (tissue masks in the OASIS release's
format: 8-bit grey PNGs, 0/85/170/255 = background/CSF/grey/white matter, square, any size;
sample i is generated for mask i mod the number of masks; a run with a SPADE decoder
decodes them given their masks). --pairs N: N samples, each with its tissue mask, decoded
from the sample's latent by the run's mask decoder (a run trained on data with masks; see
train.py --mask-decoder-steps), and its image decoded given that mask by the run's SPADE
decoder, if it has one.

Writes to --out:
    samples.png          a grid of all samples
    sample_000.png ...   one file per sample and --format, at the run's image size: an 8-bit
                         grayscale PNG (png), sample_000_16bit.png (png16), sample_000.nii.gz
                         (nifti; see FORMATS)
    denoising.png        the first few samples from noise to image: latent (channel 0)
                         and its decoding at about six states, columns labelled with t
    interpolation.png    samples decoded along a spherical interpolation (slerp) between
                         the initial noises of samples 0 and 1
    conditions.png       (runs conditioned on labels) rows: the --sweep variable across its
                         training range, with the other --condition values fixed; columns: seeds
    masks.png            (runs conditioned on masks) rows: the --mask files, or without them
                         masks of the validation split; the mask, then images for it from
                         five seeds (with the --condition values, if any)
    sample_000_seg.png   (--pairs) each sample's tissue mask, in the release's format (grey
                         levels 0/85/170/255); sample_000_seg.nii.gz with --format nifti
                         (uint8 class indices 0..3, as FSL_SEG)
    pairs.png            (--pairs) the first eight samples above their masks

Sampling uses the EMA UNet (unet_ema.weights.h5) and the decoder (decoder.weights.h5) of
the run, rebuilt from its config.json, in float32 whatever precision the run trained in
(its weights are float32); `--precision mixed_bfloat16` (or `auto` on a CPU with AMX)
runs the two networks in bf16 with the sampler's state in float32: faster, and
slightly other images (README, "Samplers"). Batch b is
sampled with a seed derived from (--seed, b), so the same --seed and --batch-size give
byte-identical files.

Finding and loading the run and its batched sampling (`runs.generate`, with one
`config.SamplingOptions` built from the flags by `cli.sampling_options`) live in runs.py,
shared with evaluate.py; this file owns the figures and files written from the samples.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import os
import re
import sys
import warnings

import cli  # noqa: E402  (first: quiets TensorFlow before it loads)

cli.quiet_tensorflow()

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

import conditioning  # noqa: E402
import config as cfg  # noqa: E402
import figures  # noqa: E402
import masks  # noqa: E402
import runs  # noqa: E402

DENOISING_STATES = 6  # columns of denoising.png (fewer when the sampler has fewer steps)
DENOISING_SAMPLES = 4  # samples (row pairs) in denoising.png
INTERPOLATION_POINTS = 8  # images in interpolation.png, both ends included


# ---------------------------------------------------------------------------- interpolation


def slerp(a: np.ndarray, b: np.ndarray, fractions) -> np.ndarray:
    """Spherical interpolation between two noise tensors of the same shape.

    For each fraction u in [0, 1]:  sin((1 - u) θ) / sin θ · a + sin(u θ) / sin θ · b,
    with θ the angle between a and b flattened. u = 0 gives a, u = 1 gives b, and for
    |a| = |b| the norm stays |a| along the way (a linear mix would shrink it, and the
    UNet was only trained on noise of the norm of N(0, I)). Falls back to the linear mix
    when a and b are (anti)parallel, where the formula is undefined.

    Returns float32 (len(fractions), *a.shape).
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    u = np.asarray(fractions, np.float64).reshape((-1,) + (1,) * a.ndim)
    cos = np.dot(a.ravel(), b.ravel()) / (np.linalg.norm(a) * np.linalg.norm(b))
    theta = np.arccos(np.clip(cos, -1.0, 1.0))
    if np.sin(theta) < 1e-6:
        return ((1 - u) * a + u * b).astype(np.float32)
    return ((np.sin((1 - u) * theta) * a + np.sin(u * theta) * b) / np.sin(theta)).astype(np.float32)


def interpolate(
    run: runs.Run,
    noise_a: np.ndarray,
    noise_b: np.ndarray,
    points: int,
    options: cfg.SamplingOptions,
    condition: dict | None = None,
    tissue_mask: np.ndarray | None = None,
) -> np.ndarray:
    """Decoded samples (points, H, W, 1) started from slerp(noise_a, noise_b) at evenly spaced
    fractions 0 … 1; noise_*: (h, w, c) initial noises x_T. With DDIM and eta = 0 the two ends
    are exactly the samples of noise_a and noise_b (under the same `condition` and one
    `tissue_mask` (S, S), if any)."""
    noises = slerp(noise_a, noise_b, np.linspace(0.0, 1.0, points))
    one_batch = dataclasses.replace(options, batch_size=points)
    return runs.generate(
        run, points, one_batch, progress=False, condition=condition, tissue_masks=tissue_mask, initial_noise=noises
    ).images


# ---------------------------------------------------------------------------- tissue masks

MASK_ROWS = 6  # validation masks in masks.png when no --mask is given
PAIR_COLUMNS = 8  # pairs in pairs.png


def read_mask_files(paths: list[str]) -> np.ndarray:
    """--mask files as uint8 class indices (M, S, S), each resized to the first one's size by
    nearest neighbour; UserError (one line, naming the file) for an unreadable or non-square
    mask or a grey level outside the release's classes (masks.read_mask)."""
    classes = [masks.read_mask(path) for path in paths]
    for path, mask in zip(paths, classes, strict=True):
        if mask.shape[0] != mask.shape[1]:
            raise cli.UserError(f"mask {path} is {mask.shape[1]}x{mask.shape[0]}; masks must be square")
    return np.stack([masks.resize_mask(mask, classes[0].shape[0]) for mask in classes])


def validation_masks(run: runs.Run, count: int) -> tuple[np.ndarray, list[str]]:
    """`count` masks of the run's validation split, evenly spaced over it (uint8 (count, S, S) at
    the run's image size), and their file names."""
    _, paths = runs.split_masks(run.config)
    chosen = [paths[i] for i in np.unique(np.linspace(0, len(paths) - 1, count).round().astype(int))]
    return masks.load_masks(chosen, run.config.data.image_size), [os.path.basename(p) for p in chosen]


# ---------------------------------------------------------------------------- writing


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[-1, 1] floats → uint8 by round((x + 1) · 127.5), clipped to [0, 255]; shape kept."""
    return np.clip(np.round((np.asarray(images, np.float64) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def to_uint16(images: np.ndarray) -> np.ndarray:
    """[-1, 1] floats → uint16 by round((x + 1) / 2 · 65535), clipped to [0, 65535]; shape kept.
    dataset.load_image reads it back as x to within 1/65535."""
    return np.clip(np.round((np.asarray(images, np.float64) + 1.0) / 2.0 * 65535), 0, 65535).astype(np.uint16)


# --format: (file name ending, what it holds); sample_000<ending> ...
# With --pairs each sample's tissue mask beside it: sample_000<MASK_ENDINGS[format]>.
MASK_ENDINGS = {"png": "_seg.png", "png16": "_seg.png", "nifti": "_seg.nii.gz"}
FORMATS = {
    "png": (".png", "8-bit grayscale PNG, round((x + 1) · 127.5)"),
    "png16": ("_16bit.png", "16-bit grayscale PNG of the decoder's output, round((x + 1) / 2 · 65535)"),
    "nifti": (".nii.gz", "NIfTI-1, one 2-D slice, float32 (x + 1) · 127.5 (the 8-bit PNGs' scale, unrounded), 1 mm"),
}


def nifti_slice(image: np.ndarray, description: str):
    """A nibabel Nifti1Image of one image (H, W, 1) in [-1, 1]: float32 intensities (x + 1) · 127.5
    (the scale of the 8-bit training PNGs, 0 = background, without the rounding), shape
    (W, H, 1), 1 mm voxels, and `description` in the header (80 bytes at most).

    Orientation: the image is a radiological view (anterior up, the patient's right on the
    left), so voxel i runs from the image's left column (the patient's right) to its right
    and j from its bottom row (posterior) to its top: RAS axes x = −i, y = j.
    """
    data = ((np.asarray(image, np.float32)[::-1, :, 0].T + 1.0) * 127.5)[:, :, None].astype(np.float32)
    return _nifti(data, description)


def nifti_mask(classes: np.ndarray, description: str):
    """A nibabel Nifti1Image of one tissue mask (H, W) of class indices 0..3 (background, CSF,
    grey, white matter, as FSL_SEG codes them), uint8, oriented as `nifti_slice`'s image."""
    return _nifti(np.ascontiguousarray(np.asarray(classes, np.uint8)[::-1, :].T[:, :, None]), description)


def _nifti(data: np.ndarray, description: str):
    """The (W, H, 1) voxels `data` as a Nifti1Image: 1 mm, voxel i to the patient's left
    (RAS x = −i, see `nifti_slice`), `description` in the header (79 characters kept)."""
    import nibabel as nib  # here: only this output needs it

    affine = np.diag([-1.0, 1.0, 1.0, 1.0])
    affine[0, 3] = data.shape[0] - 1.0
    volume = nib.Nifti1Image(data, affine)
    volume.header["descrip"] = description.encode("ascii", "replace")[:79]
    volume.header.set_xyzt_units("mm")
    return volume


def save_samples(images: np.ndarray, out_dir: str, formats=("png",), descriptions=None, tissue_masks=None) -> list[str]:
    """One file per image (N, H, W, 1) and format (`FORMATS`), named sample_000.png,
    sample_000_16bit.png, sample_000.nii.gz …, each written atomically; `descriptions` (N
    strings) go into the NIfTI headers. With `tissue_masks` (N, H, W) class indices, each
    sample's mask beside it (`MASK_ENDINGS`): sample_000_seg.png in the release's grey levels
    (0/85/170/255), sample_000_seg.nii.gz with the class indices 0..3.

    Files of these names left in `out_dir` by an earlier call with a larger --n (or other
    formats, or pairs) are removed, so the folder always holds exactly this call's samples.
    Returns the paths, format by format, images before masks.
    """
    width = max(3, len(str(len(images) - 1)))
    names = {name: FORMATS[name][0] for name in formats}
    if tissue_masks is not None:  # one mask file per ending (png and png16 share _seg.png)
        for name in formats:
            if MASK_ENDINGS[name] not in names.values():
                names[f"{name}_seg"] = MASK_ENDINGS[name]
    paths = {
        name: [os.path.join(out_dir, f"sample_{i:0{width}d}{ending}") for i in range(len(images))]
        for name, ending in names.items()
    }
    wanted = {path for group in paths.values() for path in group}
    all_endings = [ending for ending, _ in FORMATS.values()] + list(MASK_ENDINGS.values())
    endings = "|".join(re.escape(ending) for ending in sorted(set(all_endings), key=len, reverse=True))
    for old in glob.glob(os.path.join(out_dir, "sample_*")):
        if re.fullmatch(rf"sample_\d+({endings})", os.path.basename(old)) and old not in wanted:
            os.remove(old)
    descriptions = descriptions or [""] * len(images)
    for name, group in paths.items():
        ending = names[name]
        for i, path in enumerate(group):
            tmp = f"{path[: -len(ending)]}.partial{ending}"  # nibabel reads format and compression off the name
            if name == "nifti":
                nifti_slice(images[i], descriptions[i]).to_filename(tmp)
            elif name == "nifti_seg":
                nifti_mask(tissue_masks[i], descriptions[i]).to_filename(tmp)
            elif name.endswith("_seg"):
                masks.write_mask(tissue_masks[i], tmp)
            else:
                pixels = (to_uint8 if name == "png" else to_uint16)(images[i])[:, :, 0]
                Image.fromarray(pixels).save(tmp, format="PNG")
            os.replace(tmp, path)
    return [path for group in paths.values() for path in group]


def make_output_folder(out_dir: str) -> None:
    """Create `out_dir` and check that it takes files, before any sampling; UserError if not."""
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise cli.UserError(f"cannot write to {out_dir}: {e.strerror}") from None
    runs.check_writable(out_dir)


def write_predictions(
    run: runs.Run,
    out_dir: str,
    n: int,
    options: cfg.SamplingOptions,
    condition: dict | None = None,
    sweep: str | None = None,
    formats=("png",),
    tissue_masks: np.ndarray | None = None,
    mask_names: list[str] | None = None,
    pairs: bool = False,
) -> list[str]:
    """Sample and write every output file of predict.py to `out_dir` (an existing folder); returns
    the file names written. options, condition: as runs.generate; sweep: the variable of
    conditions.png (runs conditioned on labels only); formats: of the per-sample files
    (`FORMATS`); tissue_masks: uint8 (M, S, S) masks of a mask-conditioned run, sample i
    generated for mask i mod M, with their `mask_names` (None: the mask is unknown); pairs:
    write each sample's tissue mask from the run's mask decoder beside it, and pairs.png (the
    images then are `runs.paired`'s)."""
    T = run.config.diffusion.timesteps
    options = options.resolved(T)
    seed, guidance, batch_size = options.seed, options.guidance, options.batch_size
    num_states = min(DENOISING_STATES, options.network_evaluations(T) + 1)
    per_sample = None if tissue_masks is None else tissue_masks[np.arange(n) % len(tissue_masks)]
    samples = runs.generate(run, n, options, num_states=num_states, condition=condition, tissue_masks=per_sample)
    label = f"{run.name}: {options.label(T)}, seed {seed}"
    if condition:
        label += ", " + ", ".join(f"{k} {v:g}" for k, v in condition.items())
    if tissue_masks is not None:
        label += f", {len(tissue_masks)} mask{'s' if len(tissue_masks) > 1 else ''}"
    if condition or tissue_masks is not None:
        label += f", guidance {guidance:g}"

    # With --pairs the images are those of the pairs (decoded given their masks when the run has a SPADE decoder).
    images, pair_masks = runs.paired(run, samples, batch_size) if pairs else (samples.images, None)
    figures.image_grid(images, os.path.join(out_dir, "samples.png"), title=label)
    written = ["samples.png"]
    asked = "".join(f" {k}={v:g}" for k, v in (condition or {}).items())
    guided = f" w={guidance:g}" if condition or tissue_masks is not None else ""
    mask_of = [f" mask={mask_names[i % len(mask_names)]}" if mask_names else "" for i in range(n)]
    descriptions = [  # the NIfTI header keeps 79 characters: the mask's name goes first
        f"oasis-ldm {run.name} #{i}{mask_of[i]} seed {seed} batch {batch_size} {options.sampler} {options.steps}"
        f"{asked}{guided}"
        for i in range(n)
    ]
    pngs = save_samples(images, out_dir, formats, descriptions, pair_masks)
    if pairs:
        shown = min(n, PAIR_COLUMNS)
        figures.image_grid(
            np.stack([images[:shown], runs.mask_image(pair_masks[:shown])]),
            os.path.join(out_dir, "pairs.png"),
            title=f"{label}: image + mask pairs (the mask decoder's)",
            row_labels=["sample", "its mask"],
        )
        written.append("pairs.png")
    elif os.path.exists(os.path.join(out_dir, "pairs.png")):  # an earlier --pairs call's
        os.remove(os.path.join(out_dir, "pairs.png"))

    shown = samples.states[:, :DENOISING_SAMPLES]
    k, s = shown.shape[:2]
    decoded = runs.decode(run, shown.reshape((k * s, *shown.shape[2:])), batch_size).reshape(
        (k, s, *samples.images.shape[1:])
    )
    figures.denoising(
        shown, decoded, samples.timesteps, os.path.join(out_dir, "denoising.png"), title=f"{label}: noise → sample"
    )
    written.append("denoising.png")

    if n >= 2:
        noise_a, noise_b = samples.states[0, 0], samples.states[0, 1]
        first_mask = None if tissue_masks is None else tissue_masks[0]
        images = interpolate(run, noise_a, noise_b, INTERPOLATION_POINTS, options, condition, first_mask)
        fractions = np.linspace(0.0, 1.0, INTERPOLATION_POINTS)
        figures.image_grid(
            images,
            os.path.join(out_dir, "interpolation.png"),
            title=f"{label}: slerp from the noise of sample 0 to that of sample 1",
            ncols=len(images),
            cell_labels=[f"{u:.2f}" for u in fractions],
        )
        written.append("interpolation.png")
    else:
        print("interpolation.png skipped: it needs --n 2 or more")
        if os.path.exists(os.path.join(out_dir, "interpolation.png")):  # an earlier call's
            os.remove(os.path.join(out_dir, "interpolation.png"))
    if run.config.condition_stats:
        condition = condition or {}
        # Sweep the first variable not asked for (or, all asked for, the first): the others stay fixed.
        stats = run.config.condition_stats
        sweep = sweep or next((name for name in stats if name not in condition), next(iter(stats)))
        fixed = {k: v for k, v in condition.items() if k != sweep}
        path = os.path.join(out_dir, "conditions.png")
        runs.conditions_figure(run, path, options, sweep, fixed)
        written.append("conditions.png")
    if run.config.mask_channels:
        if tissue_masks is None:
            shown, names = validation_masks(run, MASK_ROWS)
        else:
            shown, names = tissue_masks[:MASK_ROWS], (mask_names or [])[:MASK_ROWS]
        runs.masks_figure(run, os.path.join(out_dir, "masks.png"), shown, options, names, condition)
        written.append("masks.png")
    return written + [os.path.basename(pngs[0]) + (f" … {os.path.basename(pngs[-1])}" if len(pngs) > 1 else "")]


# ---------------------------------------------------------------------------- command line


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = cli.FlagParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_sampling_arguments(parser, n=16)
    parser.add_argument(
        "--condition",
        nargs="+",
        metavar="NAME=VALUE",
        help="conditioned runs: e.g. slice=0.6 age=80 (in the labels' units; variables left out are unknown)",
    )
    parser.add_argument(
        "--guidance",
        type=float,
        default=cfg.SamplingOptions.guidance,
        help=f"classifier-free guidance weight w: eps_u + w (eps_c - eps_u); 1 = conditional only, "
        f"0 = unconditional (default: {cfg.SamplingOptions.guidance:g})",
    )
    parser.add_argument("--sweep", metavar="NAME", help="the variable conditions.png varies (default: the first)")
    parser.add_argument(
        "--mask",
        nargs="+",
        metavar="FILE",
        help="runs conditioned on masks: tissue-mask PNGs (grey levels 0/85/170/255 = background/CSF/grey/white "
        "matter); sample i is generated for mask i mod the number of masks",
    )
    parser.add_argument(
        "--format",
        nargs="+",
        choices=FORMATS,
        default=["png"],
        help="per-sample files, one or more of: png (8-bit), png16 (16-bit, no 8-bit rounding), nifti (.nii.gz, "
        "float32) (default: png)",
    )
    parser.add_argument(
        "--pairs",
        type=int,
        metavar="N",
        help="N samples (instead of --n), each with its tissue mask from the run's mask decoder (sample_NNN_seg.png)",
    )
    parser.add_argument("--out", help="output folder (default: RUN/predictions)")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks instead of one-line errors")
    return parser.parse_args(argv)


def run(argv: list[str]) -> None:
    args = parse_args(argv)
    run_dir = runs.resolve_run(args.run)
    config = runs.read_config(run_dir)
    options = cli.sampling_options(args, config, guidance=args.guidance)
    condition = conditioning.parse_assignments(args.condition)
    with warnings.catch_warnings():  # bad names fail before any work; range warnings come with the sampling
        warnings.simplefilter("ignore")
        conditioning.requested_values(config.condition_stats, condition, 1)
    if args.sweep and args.sweep not in (config.condition_stats or {}):
        raise cli.UserError(f"--sweep {args.sweep}: the run is not conditioned on it")
    if args.mask and not config.mask_channels:
        raise cli.UserError(f"--mask: {run_dir} was trained without tissue masks (--condition {cfg.MASK})")
    if args.pairs is not None:
        if args.pairs < 1:
            raise cli.UserError(f"--pairs must be positive, got {args.pairs}")
        if args.mask:
            raise cli.UserError("--pairs and --mask: a pair's mask is the mask decoder's; give one or the other")
        args.n = args.pairs
    tissue_masks = read_mask_files(args.mask) if args.mask else None
    loaded = runs.load_run(run_dir, precision=args.precision, mask_decoder=args.pairs is not None)
    out_dir = args.out or os.path.join(run_dir, "predictions")
    make_output_folder(out_dir)
    label = options.label(config.diffusion.timesteps)
    asked = "".join(f", {k}={v:g}" for k, v in condition.items())
    if args.mask:
        asked += f", {len(args.mask)} mask{'s' if len(args.mask) > 1 else ''}"
    if config.condition.condition:
        asked += f", guidance {args.guidance:g}" if condition or args.mask else ", no condition (unconditional)"
    print(f"run {run_dir}: {args.n} sample{'s' if args.n != 1 else ''}, {label}, seed {args.seed}{asked}", flush=True)
    formats = tuple(dict.fromkeys(args.format))
    names = [os.path.basename(path) for path in args.mask] if args.mask else None
    written = write_predictions(
        loaded, out_dir, args.n, options, condition, args.sweep, formats, tissue_masks, names, args.pairs is not None
    )
    print(f"wrote {out_dir}: {', '.join(written)}")


def main(argv: list[str] | None = None) -> int:
    return cli.cli(run, argv)


if __name__ == "__main__":
    sys.exit(main())
