"""Post-processing: largest component of organs, small components in mL, holes; kinds and grids respected."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import oblique_affine

from medseg import Volume
from medseg.errors import LabelTableError
from medseg.labels import Label, LabelTable
from medseg.models.cards import PostprocessSpec
from medseg.postprocess import (
    components_touching,
    fill_holes,
    largest_component,
    postprocess_labels,
    remove_small_components,
)

TABLE = LabelTable([Label(1, "liver", (200, 0, 0), "organ"), Label(2, "tumour", (0, 200, 0), "lesion")])


def scene() -> np.ndarray:
    a = np.zeros((20, 16, 12), np.uint8)
    a[2:12, 2:12, 2:10] = 1          # liver, 800 voxels
    a[5:8, 5:8, 4:7] = 2             # tumour inside the liver (27 voxels)
    a[15:17, 13:15, 1:3] = 1         # stray liver island, 8 voxels
    a[16:19, 2:5, 8:11] = 2          # second tumour, 27 voxels
    a[0, 15, 11] = 2                 # one-voxel tumour speck
    a[9, 9, 5] = 0                   # a hole in the liver
    return a


def test_largest_component_and_small_components() -> None:
    m = scene() == 1
    assert largest_component(m).sum() == m.sum() - 8
    assert not largest_component(np.zeros((3, 3, 3), bool)).any()
    t = scene() == 2
    assert remove_small_components(t, 2).sum() == 54
    assert remove_small_components(t, 28).sum() == 0


def test_fill_holes_fills_enclosed_cavities_only() -> None:
    m = np.zeros((7, 7, 7), bool)
    m[1:6, 1:6, 1:6] = True
    m[3, 3, 3] = False
    m[1, 3, 3] = False  # a dent open to the outside
    filled = fill_holes(m)
    assert filled[3, 3, 3] and not filled[1, 3, 3]


def test_postprocess_uses_kinds_and_keeps_other_labels_in_holes() -> None:
    vol = Volume(scene(), np.diag([1.0, 1.0, 1.0, 1.0]), labels=TABLE)
    out = postprocess_labels(vol, PostprocessSpec(largest_component=True, min_component_ml=0.002, fill_holes=True))
    a = out.array
    assert out.labels == TABLE and out.same_grid(vol) and a.dtype == np.uint8
    assert (a[15:17, 13:15, 1:3] == 0).all()        # liver island: not the largest organ component
    assert (a[16:19, 2:5, 8:11] == 2).all()         # lesions keep every component above the size limit
    assert a[0, 15, 11] == 0                        # 1 voxel = 0.001 mL < 0.002 mL
    assert a[9, 9, 5] == 1                          # hole filled
    assert (a[5:8, 5:8, 4:7] == 2).all()            # the tumour inside the liver is not overwritten
    assert postprocess_labels(vol, PostprocessSpec()) is vol


def test_minimum_size_is_in_ml_on_anisotropic_grids() -> None:
    """8 voxels of 0.7 × 1.3 × 2.9 mm = 21.1 mm³: kept at 0.02 mL, removed at 0.022 mL, whatever the rotation."""
    a = np.zeros((9, 8, 7), np.uint8)
    a[1:3, 1:3, 1:3] = 2
    vol = Volume(a, oblique_affine(spacing=(0.7, 1.3, 2.9)), labels=TABLE)
    assert vol.voxel_volume_ml * 8 == pytest.approx(0.021112, abs=1e-6)
    assert postprocess_labels(vol, min_component_ml=0.020).array.sum() == 16
    assert postprocess_labels(vol, min_component_ml=0.022).array.sum() == 0


def test_postprocess_needs_a_label_table() -> None:
    with pytest.raises(LabelTableError, match="needs a label table"):
        postprocess_labels(Volume(scene(), np.eye(4)), fill=True)


def test_minimum_size_per_label_overrides_the_card_wide_one() -> None:
    vol = Volume(scene(), np.diag([1.0, 1.0, 1.0, 1.0]), labels=TABLE)
    # Tumours below 0.03 mL go (both 27-voxel tumours and the speck); the 8-voxel liver island stays (0.002 mL).
    spec = PostprocessSpec(min_component_ml=0.002, min_component_ml_by_label={"tumour": 0.03})
    a = postprocess_labels(vol, spec).array
    assert not (a == 2).any()
    assert (a[15:17, 13:15, 1:3] == 1).all()
    # The per-label limit alone is enough to run; an explicit min_component_ml argument overrides every label.
    only = postprocess_labels(vol, PostprocessSpec(min_component_ml_by_label={"tumour": 0.002})).array
    assert only[0, 15, 11] == 0 and (only[16:19, 2:5, 8:11] == 2).all()
    assert (postprocess_labels(vol, spec, min_component_ml=0.0).array == vol.array).all()


def test_card_names_labels_of_the_per_label_minimum() -> None:
    from medseg.errors import ModelCardError
    from medseg.models.cards import parse_card

    def card(by_label):
        return parse_card({"name": "m", "network": {"name": "UNet", "kwargs": {"out_channels": 3}},
                           "labels": [{"value": 1, "name": "liver"}, {"value": 2, "name": "tumour", "kind": "lesion"}],
                           "postprocessing": {"min_component_ml": 0.2, "min_component_ml_by_label": by_label}})

    assert card({"tumour": 0.5}).postprocessing.min_component_ml_by_label == {"tumour": 0.5}
    assert card({"tumour": 0.5}).summary()["postprocessing"]["min_component_ml_by_label"] == {"tumour": 0.5}
    with pytest.raises(ModelCardError, match="tumor.*did you mean 'tumour'"):
        card({"tumor": 0.5})
    with pytest.raises(ModelCardError, match=r"min_component_ml_by_label\.tumour"):
        card({"tumour": -1})


def test_components_touching_overlap_or_neighbour() -> None:
    m = np.zeros((9, 8, 7), bool)
    host = np.zeros_like(m)
    host[0:3, 0:3, 0:3] = True
    m[3, 1, 1] = True            # face neighbour of the host
    m[3:5, 3, 3] = True          # diagonal neighbour only (corner 2, 2, 2)
    m[6:8, 6:8, 5:7] = True      # two voxels away: not touching
    m[1, 1, 1] = True            # inside the host (overlap), a component of its own
    got26 = components_touching(m, host)
    assert got26[3, 1, 1] and got26[3, 3, 3] and got26[4, 3, 3] and got26[1, 1, 1] and not got26[6:8, 6:8, 5:7].any()
    got6 = components_touching(m, host, connectivity=6)
    assert got6[3, 1, 1] and got6[1, 1, 1] and not got6[3:5, 3, 3].any()
    assert not components_touching(m, np.zeros_like(m)).any() and not components_touching(host & False, host).any()


def test_lesion_hosts_drop_lesions_away_from_the_cleaned_host() -> None:
    a = scene()
    a[15:17, 13:15, 3:5] = 2         # a tumour on the stray liver island only
    vol = Volume(a, oblique_affine(spacing=(0.7, 1.3, 2.9)), labels=TABLE)
    hosts = {"tumour": ("liver",)}
    out = postprocess_labels(vol, PostprocessSpec(largest_component=True, lesion_hosts=hosts)).array
    assert (out[5:8, 5:8, 4:7] == 2).all()                       # inside the liver: kept
    assert not (out[16:19, 2:5, 8:11] == 2).any() and out[0, 15, 11] == 0   # away from any liver: dropped
    assert not (out[15:17, 13:15, 1:5] > 0).any()                # the island went, and its tumour with it
    kept = postprocess_labels(vol, PostprocessSpec(lesion_hosts=hosts)).array   # no organ clean-up
    assert (kept[15:17, 13:15, 3:5] == 2).all() and (kept[15:17, 13:15, 1:3] == 1).all()
    assert not (kept[16:19, 2:5, 8:11] == 2).any()
    assert ((kept == 1) == (a == 1)).all()                       # hosts themselves are untouched


def test_card_checks_lesion_hosts() -> None:
    from medseg.errors import ModelCardError
    from medseg.models.cards import parse_card

    def card(hosts):
        return parse_card({"name": "m", "network": {"name": "UNet", "kwargs": {"out_channels": 3}},
                           "labels": [{"value": 1, "name": "liver"}, {"value": 2, "name": "tumour", "kind": "lesion"}],
                           "postprocessing": {"lesion_hosts": hosts}})

    assert card({"tumour": ["liver"]}).postprocessing.lesion_hosts == {"tumour": ("liver",)}
    assert card({"tumour": "liver"}).summary()["postprocessing"]["lesion_hosts"] == {"tumour": ["liver"]}
    with pytest.raises(ModelCardError, match="tumor.*did you mean 'tumour'"):
        card({"tumor": ["liver"]})
    with pytest.raises(ModelCardError, match="names 'livr'.*did you mean 'liver'"):
        card({"tumour": ["livr"]})
    with pytest.raises(ModelCardError, match="names 'tumour', which is not another label"):
        card({"tumour": ["tumour"]})
    with pytest.raises(ModelCardError, match=r"lesion_hosts\.tumour.*a list of host label names"):
        card({"tumour": []})
