"""The shipped `phantom-abdomen-ct` model: weights match the card, tampering is refused, it segments phantoms."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from medseg.errors import ChecksumMismatchError
from medseg.files import sha256_file
from medseg.models import find_model, shipped_dir
from medseg.models.networks import build_network
from medseg.models.weights import load_weights

NAME = "phantom-abdomen-ct"


@pytest.fixture(scope="module")
def card():  # type: ignore[no-untyped-def]
    return find_model(NAME)


def test_card_weights_sha256_and_size(card) -> None:  # type: ignore[no-untyped-def]
    assert card.origin == "shipped" and card.source == shipped_dir() / f"{NAME}.yaml"
    assert card.weights is not None and card.weights.path == shipped_dir() / f"{NAME}.pt"
    assert card.weights.path.stat().st_size <= 10 * 1024 * 1024
    assert sha256_file(card.weights.path) == card.weights.sha256
    assert [card.labels.names[v] for v in sorted(card.labels)] == [
        "liver", "spleen", "kidney_left", "kidney_right", "liver_tumour", "kidney_tumour"]
    prov = card.provenance
    assert prov["trained_by"] == "medseg train"
    # trained with a recipe of the repository, as it is now (stages: docs/training.md)
    recipe = Path(__file__).resolve().parents[1] / "workflows" / prov["recipe"]
    assert recipe.name.startswith("train-phantom-abdomen-ct") and prov["recipe_text"] == recipe.read_text()
    assert len(prov["init_from"]["weights_sha256"]) == 64  # fine-tuned from an earlier stage's recorded weights
    held = prov["heldout_evaluation"]  # one entry per held-out set scored (benchmarks/eval_shipped_models.py --record)
    assert held[0]["seeds"] == [90000, 90010] and all(h["all_on_input_grid"] is True for h in held)
    assert len({tuple(h["seeds"]) for h in held}) == len(held)


def test_tampered_weights_are_refused(card, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    assert card.network is not None and card.weights is not None
    copy = tmp_path / "tampered.pt"
    shutil.copy(card.weights.path, copy)
    data = bytearray(copy.read_bytes())
    data[-100] ^= 0x01
    copy.write_bytes(bytes(data))
    net = build_network(card.network.name, card.network.kwargs)
    with pytest.raises(ChecksumMismatchError, match="refusing to load it"):
        load_weights(net, copy, sha256=card.weights.sha256)
    load_weights(net, card.weights.path, sha256=card.weights.sha256)  # the original loads


def test_segments_a_small_phantom_on_its_own_grid(card) -> None:  # type: ignore[no-untyped-def]
    from medseg.inference import Segmenter
    from medseg.metrics import evaluate
    from medseg.phantom import make_phantom

    # Unseen seed, anisotropic spacing, a flipped and permuted orientation; 5 mm voxels keep it quick.
    ph = make_phantom(424243, shape=(72, 84, 46), spacing_mm=(5.6, 4.8, 5.8), orientation="PRI", liver_tumours=2,
                      kidney_tumour=True)
    seg = Segmenter(card, device="cpu").segment(ph.image)
    assert seg.labels.same_grid(ph.image) and seg.labels.shape == ph.image.shape
    assert np.array_equal(seg.labels.affine, ph.image.affine)
    result = evaluate(seg.labels, ph.labels)
    for organ in ("liver", "spleen", "kidney_left", "kidney_right"):
        assert result[organ].dice >= ORGAN_DICE_MIN, (organ, result[organ].dice)
    for lesion in ("liver_tumour", "kidney_tumour"):
        assert not result[lesion].ref_empty
        assert result.lesion(lesion).tp_ref >= 1, lesion  # found, even on 5 mm voxels
        assert result[lesion].dice >= TUMOUR_DICE_MIN, (lesion, result[lesion].dice)


# Measured with the shipped weights (stage 5) on this phantom (CPU): liver 0.940, spleen 0.943, kidney_left 0.958,
# kidney_right 0.903, liver_tumour 0.815, kidney_tumour 0.846 (stage 4: 0.914, 0.928, 0.947, 0.867, 0.719, 0.754);
# the thresholds sit below both.
ORGAN_DICE_MIN = 0.85
TUMOUR_DICE_MIN = 0.6


@pytest.mark.gpu
def test_shipped_model_on_cuda_matches_cpu(card) -> None:  # type: ignore[no-untyped-def]
    from medseg.inference import Segmenter
    from medseg.phantom import make_phantom

    ph = make_phantom(424243, shape=(72, 84, 46), spacing_mm=(5.6, 4.8, 5.8), orientation="PRI", liver_tumours=2,
                      kidney_tumour=True)
    cpu = Segmenter(card, device="cpu").segment(ph.image).labels
    gpu = Segmenter(card, device="cuda").segment(ph.image)
    assert gpu.device.startswith("cuda") and gpu.labels.same_grid(ph.image)
    assert (gpu.labels.array == cpu.array).mean() > 0.99  # fp16 on CUDA when the defaults choose it
