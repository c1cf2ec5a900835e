"""medseg.review: per-label numbers kept exact edit by edit (against a full recount), and the review record."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medseg.errors import GridMismatchError
from medseg.labels import Label, LabelTable
from medseg.review import LabelTally, new_edit, review_record

TABLE = LabelTable([Label(1, "liver", (200, 100, 100)), Label(2, "tumour", (255, 255, 0), "lesion")])


def _recount(labels, image, proposal, v):
    m = labels == v
    return (int(m.sum()), float(image[m].mean()) if m.any() else np.nan, float(image[m].std()) if m.any() else np.nan,
            int((m & (proposal != v)).sum()), int(((proposal == v) & ~m).sum()))


def test_random_edits_keep_the_tally_equal_to_a_recount() -> None:
    rng = np.random.default_rng(3)
    shape = (9, 7, 5)
    proposal = rng.integers(0, 3, shape).astype(np.uint8)
    image = rng.normal(40, 20, shape).astype(np.float32)
    labels = proposal.copy()
    tally = LabelTally(labels, voxel_volume_ml=0.002, image=image, proposal=proposal)
    for _ in range(40):
        idx = tuple(rng.integers(0, n, 12) for n in shape)
        flat = np.unique(np.ravel_multi_index(idx, shape))
        new = rng.integers(0, 3, len(flat)).astype(np.uint8)
        old = labels.ravel()[flat].copy()
        labels.ravel()[flat] = new
        tally.apply_change(flat, old, new)
    for v in (1, 2):
        n, mean, sd, added, removed = _recount(labels, image, proposal, v)
        row = tally.row(v, TABLE)
        assert (row.voxels, row.voxels_added, row.voxels_removed) == (n, added, removed)
        assert row.intensity_mean == pytest.approx(mean) and row.intensity_std == pytest.approx(sd, rel=1e-6)
        assert row.volume_ml == pytest.approx(n * 0.002)
        assert row.change_ml == pytest.approx((added - removed) * 0.002)
        box = tally.box(v)
        assert box is not None and (labels[box] == v).sum() == n
    assert tally.lesion_count(labels, 2) >= 1


def test_painting_a_block_changes_ml_by_n_voxels_and_the_record_lists_it() -> None:
    labels = np.zeros((10, 10, 10), np.uint8)
    labels[2:5, 2:5, 2:5] = 1
    proposal = labels.copy()
    tally = LabelTally(labels, voxel_volume_ml=0.5, proposal=proposal)
    before = tally.volume_ml(1)
    sl = (slice(6, 8), slice(6, 9), slice(1, 5))  # 24 background voxels
    old = labels[sl].copy()
    labels[sl] = 1
    idx = np.nonzero(np.ones_like(old, bool))
    flat = np.ravel_multi_index(tuple(i + s.start for i, s in zip(idx, sl)), labels.shape)
    changes = tally.apply_change(flat, old.ravel(), labels[sl].ravel())
    assert tally.volume_ml(1) - before == pytest.approx(24 * 0.5)
    assert changes == {0: [0, 24], 1: [24, 0]}
    record = review_record(tally, table=TABLE, statuses={1: "done"}, edits=[new_edit("paint", "apply", 1, changes)],
                           reviewer="Dr. Test", started="2026-01-01T00:00:00+00:00",
                           model={"name": "m", "version": "1", "weights_sha256": "ab"})
    json.dumps(record)
    liver = next(r for r in record["labels"] if r["name"] == "liver")
    assert (liver["status"], liver["voxels_added"], liver["ml_added"]) == ("done", 24, 12.0)
    assert record["edits"][0]["voxels_changed"] == 24 and record["edits"][0]["changes"]["1"] == [24, 0]
    with pytest.raises(ValueError, match="Review statuses"):
        review_record(tally, table=TABLE, statuses={1: "finished"}, edits=[], reviewer="", started="")


def test_shapes_must_agree() -> None:
    with pytest.raises(GridMismatchError, match="proposal has shape"):
        LabelTally(np.zeros((2, 3, 4), np.uint8), voxel_volume_ml=1, proposal=np.zeros((4, 3, 2), np.uint8))


def test_instance_seams_separate_touching_instances_only() -> None:
    import cc3d

    from medseg.review import instance_seams

    inst = np.zeros((6, 5, 4), np.uint16)
    inst[:3] = 1
    inst[3:] = 2
    inst[:, 0] = 0
    seams = instance_seams(inst)
    assert seams[3:4, 1:].all() and seams.sum() == 4 * 4  # the first layer of instance 2 goes
    _, n = cc3d.connected_components((inst > 0) & ~seams, connectivity=26, return_N=True)
    assert n == 2
    one = (inst > 0).astype(np.uint16)
    assert not instance_seams(one).any()  # a single instance, touching the array border, has no seam
