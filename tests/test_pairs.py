"""pairs.py: the usefulness protocol on a tiny case, the pairs' own checks, the mask decoder
and metrics.nearest_mask_dice (predict.py --pairs and evaluate.py's pair metrics end to end:
tests/test_conditional_run.py)."""

import keras
import numpy as np
import pytest

import metrics
import oracle
import pairs
from autoencoder import build_mask_decoder
from test_oracle import tissue


def test_nearest_mask_dice_known_answers():
    references = np.zeros((3, 4, 4), np.uint8)
    references[0, :2] = 1  # top half CSF
    references[1, :, :2] = 2  # left half grey matter
    references[2] = 3
    query = references[[1, 0]].copy()
    query[1, 0, 0] = 0  # one CSF pixel less: 2·7 / (7 + 8)
    scores, index = metrics.nearest_mask_dice(query, references)
    np.testing.assert_array_equal(index, [1, 0])
    np.testing.assert_allclose(scores, [1.0, 14 / 15])
    # An empty query overlaps no reference (Dice 0); against empty references too, nothing to
    # overlap: NaN.
    empty = np.zeros((1, 4, 4), np.uint8)
    assert metrics.nearest_mask_dice(empty, references)[0].tolist() == [0.0]
    assert np.isnan(metrics.nearest_mask_dice(empty, np.zeros((2, 4, 4), np.uint8))[0][0])
    with pytest.raises(ValueError, match=r"nearest_mask_dice: masks of shapes \(2, 4, 4\) and \(3, 5, 5\)"):
        metrics.nearest_mask_dice(query, np.zeros((3, 5, 5), np.uint8))


def test_copies_of_the_real_pairs_train_exactly_the_real_only_segmenter():
    """The protocol's own control: a 'synthetic' set that is a copy of the real pairs gives the
    same segmenter (same steps, batch, seed and data) and so the same Dice on the test pairs;
    a set of wrong masks does far worse."""
    real, test = tissue(64, seed=0), tissue(16, seed=1)
    wrong = (real[0], np.roll(real[1], 5, axis=2))  # every mask shifted off its image
    scores = pairs.usefulness(
        {"real_only": real, "synthetic_only": (real[0].copy(), real[1].copy()), "wrong": wrong},
        test,
        steps=40,
        batch_size=16,
    )
    for suffix in ("", "_csf", "_grey_matter", "_white_matter"):
        assert scores[f"seg_dice_synthetic_only{suffix}"] == scores[f"seg_dice_real_only{suffix}"], suffix
    assert scores["seg_dice_real_only"] > 0.6, scores
    assert scores["seg_dice_wrong"] < scores["seg_dice_real_only"] - 0.2, scores
    assert scores["seg_pairs_real_only"] == 64


def test_pair_scores_find_matching_masks_and_copied_ones():
    images, classes = tissue(48, seed=2)
    judge = oracle.train_segmenter(oracle.segmentation_stream(images, classes, 16), 16, steps=60, seed=0)
    faithful = pairs.pair_scores((images[:8], classes[:8]), judge, classes[8:], classes[:8])
    shuffled = pairs.pair_scores((images[:8], classes[[1, 2, 3, 4, 5, 6, 7, 0]]), judge, classes[8:], classes[:4])
    assert faithful["pair_dice"] > shuffled["pair_dice"] + 0.1, (faithful, shuffled)
    copied = pairs.pair_scores((images[8:16], classes[8:16]), judge, classes[8:], classes[:4])
    assert copied["mask_nn_dice_median"] == pytest.approx(1.0) and copied["mask_nn_dice_max"] == pytest.approx(1.0)
    assert faithful["real_mask_nn_dice_median"] == faithful["mask_nn_dice_median"] < 1.0


def test_the_mask_decoder_maps_a_latent_to_mask_logits_at_the_image_size():
    keras.config.set_dtype_policy("mixed_bfloat16")
    decoder = build_mask_decoder(latent_channels=2, downsample_factor=4, width=8)
    logits = decoder(np.zeros((3, 4, 4, 2), np.float32))
    assert logits.shape == (3, 16, 16, 4) and logits.dtype == "float32"
    with pytest.raises(ValueError, match="a power of 2, got 3"):
        build_mask_decoder(2, 3)
