"""The Review widget with a real viewer under Xvfb: numbers live after paint, fill, erase, undo and redo (napari 0.9
replays history without a paint event: ReviewLabels reports it), locked labels, the correction tools equal to the
library functions and undone in one step, export read back with its review record."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import DATA

pytestmark = pytest.mark.napari
napari = pytest.importorskip("napari")
pytest.importorskip("pytestqt")

from medseg_napari._layers import ReviewLabels, image_layer_data, labels_layer_data
from medseg_napari._review import CHANGES_LAYER, ReviewWidget
from medseg_napari._tools import display_volume

from medseg import Volume, load_volume
from medseg.classical import otsu_in_box, region_grow, remove_islands, watershed_split
from medseg.phantom import make_phantom
from medseg.postprocess import largest_component
from medseg.review import instance_seams

LIVER, SPLEEN, TUMOUR = 1, 2, 5


def data_to_world(layer, idx):
    return np.asarray(idx, float) * np.asarray(layer.scale) + np.asarray(layer.translate)


@pytest.fixture
def review(make_napari_viewer):
    """A small phantom CT with its truth as the AI proposal and a reviewed copy (as the Segment widget leaves them)."""
    phantom = make_phantom(11, shape=(72, 64, 40), orientation="RAS", liver_tumours=2)
    viewer = make_napari_viewer(show=True)
    data, kwargs, _ = image_layer_data(phantom.image, "CT")
    viewer.add_image(data, **kwargs)
    data, kwargs, _ = labels_layer_data(phantom.labels, "AI proposal")
    viewer.add_layer(ReviewLabels(data, **kwargs))
    viewer.layers["AI proposal"].editable = False
    viewer.add_layer(ReviewLabels(data.copy(), **{**kwargs, "name": "Reviewed"}))
    widget = ReviewWidget(viewer)
    viewer.window.add_dock_widget(widget)
    assert widget.layer is viewer.layers["Reviewed"] and widget.proposal is viewer.layers["AI proposal"]
    return viewer, widget, phantom


def row(widget, value):
    return next(r for r in widget.rows() if r.value == value)


def stroke(layer, MouseEvent, points, z):
    """A real paint stroke through napari's mouse callbacks in the axial plane at slice z (data coordinates)."""
    from napari.utils._proxies import ReadOnlyWrapper
    from napari.utils.interactions import mouse_move_callbacks, mouse_press_callbacks, mouse_release_callbacks

    def event(kind, pos, dragging):
        world = data_to_world(layer, (z, *pos))
        return ReadOnlyWrapper(MouseEvent(type=kind, is_dragging=dragging, position=tuple(world),
                                          view_direction=None, dims_displayed=(1, 2), dims_point=tuple(world)))

    mouse_press_callbacks(layer, event("mouse_press", points[0], False))
    for p in points[1:]:
        mouse_move_callbacks(layer, event("mouse_move", p, True))
    mouse_release_callbacks(layer, event("mouse_release", points[-1], False))


def test_paint_fill_erase_undo_redo_keep_the_numbers_exact(review, MouseEvent, qtbot) -> None:
    viewer, widget, _ = review
    layer = widget.layer
    voxel_ml = widget.tally.voxel_volume_ml
    before = row(widget, SPLEEN).volume_ml
    z = layer.data.shape[0] // 2
    layer.mode = "paint"
    layer.selected_label = SPLEEN
    layer.brush_size = 5
    old = np.array(layer.data, copy=True)
    stroke(layer, MouseEvent, [(5, 5), (5, 15), (12, 15)], z)
    n = int(((layer.data == SPLEEN) & (old != SPLEEN)).sum()) - int(((old == SPLEEN) & (layer.data != SPLEEN)).sum())
    assert n > 20
    assert row(widget, SPLEEN).volume_ml - before == pytest.approx(n * voxel_ml)
    assert row(widget, SPLEEN).change_ml == pytest.approx(n * voxel_ml)
    assert widget.edits[-1].tool == "paint" and widget.edits[-1].voxels_changed == n
    assert widget.grid.item(widget._values.index(SPLEEN), 4).text() == f"{row(widget, SPLEEN).volume_ml:.2f}"
    # a real Ctrl+Z / Ctrl+Shift+Z on the canvas
    from qtpy.QtCore import Qt

    viewer.layers.selection.active = layer
    canvas = viewer.window._qt_viewer.canvas.native
    qtbot.keyClick(canvas, Qt.Key.Key_Z, Qt.KeyboardModifier.ControlModifier)
    assert np.array_equal(layer.data, old)
    assert row(widget, SPLEEN).volume_ml == pytest.approx(before) and row(widget, SPLEEN).change_ml == 0
    qtbot.keyClick(canvas, Qt.Key.Key_Z, Qt.KeyboardModifier.ControlModifier | Qt.KeyboardModifier.ShiftModifier)
    assert row(widget, SPLEEN).volume_ml - before == pytest.approx(n * voxel_ml)
    assert [e.action for e in widget.edits[-3:]] == ["apply", "undo", "redo"]
    # fill and erase, then compare everything with a recount
    layer.fill((z, 2, 2), 7)  # the air around the body becomes label 7 on this slice
    layer.mode = "erase"
    layer.paint((z, 30, 30), 0)
    data, image = np.asarray(layer.data), np.asarray(viewer.layers["CT"].data)
    ai = np.asarray(viewer.layers["AI proposal"].data)
    for v in (LIVER, SPLEEN, 7):
        m = data == v
        r = row(widget, v)
        assert r.voxels == int(m.sum())
        assert r.intensity_mean == pytest.approx(float(image[m].mean()))
        assert r.voxels_added == int((m & (ai != v)).sum()) and r.voxels_removed == int(((ai == v) & ~m).sum())
    layer.undo()
    layer.undo()
    layer.undo()
    assert row(widget, SPLEEN).volume_ml == pytest.approx(before) and np.array_equal(layer.data, old)
    assert all(r.voxels_added == 0 and r.voxels_removed == 0 for r in widget.rows())


def test_locked_labels_are_not_painted_over(review) -> None:
    _, widget, _ = review
    layer = widget.layer
    liver_before = int((layer.data == LIVER).sum())
    widget.set_locked(LIVER, True)
    z, j, i = np.argwhere(layer.data == LIVER)[len(np.argwhere(layer.data == LIVER)) // 2]
    layer.brush_size = 9
    layer.paint((z, j, i), SPLEEN)
    assert int((layer.data == LIVER).sum()) == liver_before
    widget.set_locked(LIVER, False)
    layer.paint((z, j, i), SPLEEN)
    assert int((layer.data == LIVER).sum()) < liver_before
    assert row(widget, LIVER).voxels == int((layer.data == LIVER).sum())


def test_tools_change_the_layer_as_the_library_does_and_undo_in_one_step(review) -> None:
    viewer, widget, _ = review
    layer = widget.layer
    image = viewer.layers["CT"]
    original = np.array(layer.data, copy=True)
    meta = layer.metadata
    # region grow from a liver voxel, within the liver's HU window, into a new label 9
    inside = np.argwhere((original == LIVER) & (np.asarray(image.data) >= 20) & (np.asarray(image.data) <= 120))
    seed = tuple(int(c) for c in inside[len(inside) // 2])
    layer.selected_label = 9
    change = widget.propose("grow", seed_world=data_to_world(layer, seed), lower=20, upper=120)
    grown = region_grow(display_volume(image.data, meta), seed[::-1], lower=20, upper=120).array.transpose(2, 1, 0)
    assert "tool preview" in viewer.layers and change.add.size == int(grown.sum())
    widget.apply_pending()
    assert "tool preview" not in viewer.layers
    assert np.array_equal(layer.data == 9, grown > 0) and widget.edits[-1].tool == "region_grow"
    assert row(widget, 9).voxels == int(grown.sum())
    layer.undo()
    assert np.array_equal(layer.data, original) and row(widget, 9).voxels == 0
    # island removal on the liver after sprinkling two 1-voxel islands
    with layer.block_history():
        layer.data_setitem((np.array([1, 2]), np.array([1, 3]), np.array([1, 5])), LIVER)
    layer.selected_label = LIVER
    widget.propose("islands", min_ml=0.5)
    widget.apply_pending()
    sprinkled = ((original == LIVER) | _islands(original.shape)).astype(np.uint8)
    kept = remove_islands(display_volume(sprinkled, meta), min_ml=0.5).array.transpose(2, 1, 0)
    assert np.array_equal(layer.data == LIVER, kept > 0) and int(sprinkled.sum() - kept.sum()) == 2
    layer.undo()
    assert int((layer.data == LIVER).sum()) == int((original == LIVER).sum()) + 2
    widget.propose("largest")  # the same two islands go with "keep the largest component"
    widget.apply_pending()
    assert np.array_equal(layer.data == LIVER, largest_component(sprinkled > 0)) and widget.edits[-1].voxels_changed == 2
    layer.undo()
    layer.undo()
    assert np.array_equal(layer.data, original)
    # Otsu inside a box around the spleen, into label 9 (locked liver voxels are kept)
    zs, js, is_ = np.nonzero(original == SPLEEN)
    box = [(int(a.min()) - 1, int(a.max()) + 2) for a in (zs, js, is_)]
    layer.selected_label = 9
    widget.set_locked(LIVER, True)
    change = widget.propose("otsu", box_data=box)
    widget.apply_pending()
    otsu = otsu_in_box(display_volume(image.data, meta), box[::-1]).array.transpose(2, 1, 0) > 0
    assert np.array_equal(layer.data == 9, otsu & (original != LIVER)) and change.add.size > 0
    widget.set_locked(LIVER, False)
    layer.undo()
    assert np.array_equal(layer.data, original)
    # watershed split of two touching tumour spheres
    touching = np.array(original, copy=True)
    kk, jj, ii = np.indices(original.shape)
    for c in ((20, 32, 24), (20, 32, 33)):
        touching[(kk - c[0]) ** 2 + (jj - c[1]) ** 2 + (ii - c[2]) ** 2 <= 25] = TUMOUR
    changed = np.nonzero(touching != original)
    with layer.block_history():
        layer.data_setitem(changed, touching[changed])
    before = widget.tally.lesion_count(np.asarray(layer.data), TUMOUR)
    layer.selected_label = TUMOUR
    widget.propose("split", min_distance_mm=10.0)
    widget.apply_pending()
    split = watershed_split(display_volume((touching == TUMOUR).astype(np.uint8), meta), min_distance_mm=10.0)
    seams = instance_seams(split.array.transpose(2, 1, 0))
    assert seams.any() and np.array_equal(layer.data == TUMOUR, (touching == TUMOUR) & ~seams)
    after = widget.tally.lesion_count(np.asarray(layer.data), TUMOUR)
    assert after == int(split.array.max()) > before
    layer.undo()
    assert np.array_equal(layer.data, touching)


def _islands(shape):
    m = np.zeros(shape, bool)
    m[1, 1, 1] = m[2, 3, 5] = True
    return m


def test_rows_select_and_centre_lesions_changes_overlay_and_compare(review) -> None:
    viewer, widget, _phantom = review
    widget.select_label(TUMOUR)
    assert widget.layer.selected_label == TUMOUR and len(widget.lesions) >= 1
    widget.goto_lesion(0)
    centre = np.asarray(viewer.scene.camera.center)
    from medseg.display import ras_to_world

    assert np.allclose(centre[-2:], ras_to_world(widget.lesions[0].centroid_mm)[-2:])
    widget.changes_check.setChecked(True)
    assert CHANGES_LAYER in viewer.layers and not viewer.layers[CHANGES_LAYER].data.any()
    layer = widget.layer
    layer.selected_label = SPLEEN
    layer.paint((20, 5, 5), SPLEEN)
    assert (viewer.layers[CHANGES_LAYER].data == 1).sum() == row(widget, SPLEEN).voxels_added > 0
    widget.reference_combo.setCurrentText("AI proposal")
    metrics = widget.compare()
    assert metrics[LIVER][0] == pytest.approx(1.0) and metrics[SPLEEN][0] < 1.0


def test_export_reads_back_identical_with_the_review_record(review, tmp_path: Path) -> None:
    _viewer, widget, phantom = review
    layer = widget.layer
    layer.selected_label = SPLEEN
    layer.mode = "paint"
    layer.paint((20, 5, 5), SPLEEN)
    n = row(widget, SPLEEN).voxels_added
    layer.undo()
    layer.redo()
    widget.statuses[SPLEEN] = "done"
    files = widget.export(tmp_path / "out", reviewer="Dr. Review")
    back = load_volume(files["labels"])
    expected = np.array(phantom.labels.array, copy=True)
    from medseg.display import volume_from_layer

    edited = volume_from_layer(layer.data, layer.metadata)
    assert back.same_grid(phantom.labels) and np.array_equal(back.array, edited.array)
    assert int((back.array != expected).sum()) == n
    assert back.labels is not None and back.labels.names == phantom.labels.labels.names
    record = json.loads(Path(files["review_record"]).read_text())
    assert record["reviewer"] == "Dr. Review"
    assert [(e["tool"], e["action"], e["voxels_changed"]) for e in record["edits"]] == [
        ("paint", "apply", n), ("paint", "undo", n), ("paint", "redo", n)]
    spleen = next(r for r in record["labels"] if r["value"] == SPLEEN)
    assert spleen["status"] == "done" and spleen["voxels_added"] == n
    assert spleen["ml_added"] == pytest.approx(n * phantom.labels.voxel_volume_ml, abs=1e-3)
    assert "spleen" in Path(files["statistics"]).read_text()
    assert "dicom_seg" not in files  # a phantom made in memory has no DICOM source


def test_export_of_a_dicom_source_writes_a_semiautomatic_seg(make_napari_viewer, tmp_path: Path) -> None:
    import pydicom
    from medseg_napari._reader import read_medseg

    from medseg.io import load_segmentation
    from medseg.labels import LabelTable

    viewer = make_napari_viewer()
    for data, kwargs, _kind in read_medseg(str(DATA / "dicom_seg_example" / "ct_3slice")):
        viewer.add_image(data, **kwargs)
    ct = load_volume(DATA / "dicom_seg_example" / "ct_3slice")
    seg = load_volume(DATA / "dicom_seg_example" / "liver_seg.nrrd")
    labels = Volume(seg.array.astype(np.uint8), ct.affine, labels=LabelTable.from_names({1: "liver"}),
                    source=ct.source)
    data, kwargs, _ = labels_layer_data(labels, "Reviewed")
    kwargs["metadata"]["medseg"]["model"] = {"name": "m", "version": "2", "weights_sha256": "ab" * 32}
    viewer.add_layer(ReviewLabels(data, **kwargs))
    widget = ReviewWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.layer.selected_label = 1
    widget.layer.paint((1, 100, 100), 1)  # one edit, so the SEG holds reviewed labels, not the file's
    files = widget.export(tmp_path, reviewer="r")
    record = json.loads(Path(files["review_record"]).read_text())
    assert record["dicom_seg_note"] is None and record["files"]["dicom_seg"] == files["dicom_seg"]
    back = load_segmentation(files["dicom_seg"], reference=ct)
    from medseg.display import volume_from_layer

    assert np.array_equal(back.array, volume_from_layer(widget.layer.data, widget.layer.metadata).array)
    ds = pydicom.dcmread(files["dicom_seg"], stop_before_pixels=True)
    assert ds.SegmentSequence[0].SegmentAlgorithmType == "SEMIAUTOMATIC"
    assert ds.SegmentSequence[0].SegmentAlgorithmName.startswith("m")
