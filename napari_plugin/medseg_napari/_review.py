"""The Review dock widget: one row per label, live after every paint, fill, erase, undo and redo; correction
tools previewed and applied as one undoable step; export with a review record.

Every number comes from medseg: :class:`medseg.review.LabelTally` (counts, mL, mean ± SD, change against the AI
proposal, updated from the changed voxels only), :func:`medseg.stats.volume_stats` (lesions),
:func:`medseg.metrics.evaluate` (Dice, HD95), the tools of :mod:`medseg_napari._tools` (medseg.classical) and
:func:`medseg.review.review_record`.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
from qtpy.QtCore import Qt, QTimer
from qtpy.QtGui import QColor
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from medseg.display import METADATA_KEY, ras_to_world
from medseg.errors import MedsegError
from medseg.files import atomic_write_text
from medseg.review import REVIEW_STATUSES, EditRecord, LabelTally, new_edit, review_record

__all__ = ["CHANGES_LAYER", "COLUMNS", "PREVIEW_LAYER", "ReviewWidget"]

CHANGES_LAYER = "changes vs AI"
PREVIEW_LAYER = "tool preview"
COLUMNS = ("show", "lock", "colour", "name", "mL", "Δ vs AI mL", "mean ± SD", "lesions", "status", "Dice", "HD95 mm")
_NONE = "—"


def _labels_layers(viewer: Any) -> list[Any]:
    return [layer for layer in viewer.layers if layer.__class__.__name__ in ("Labels", "ReviewLabels")
            and METADATA_KEY in layer.metadata and layer.name not in (CHANGES_LAYER, PREVIEW_LAYER)]


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


class ReviewWidget(QWidget):
    """Review, correct and export a segmentation."""

    def __init__(self, napari_viewer: Any) -> None:
        from medseg_napari._view import install_orientation_letters

        super().__init__()
        self.viewer = napari_viewer
        install_orientation_letters(napari_viewer)
        self.layer: Any = None
        self.proposal: Any = None
        self.image: Any = None
        self.tally: LabelTally | None = None
        self.table: Any = None  # LabelTable
        self.edits: list[EditRecord] = []
        self.statuses: dict[int, str] = {}
        self.hidden: set[int] = set()
        self.metrics: dict[int, tuple[float, float]] = {}
        self.lesions: list[Any] = []
        self.lesion_index = -1
        self.pending: Any = None
        self.started = _now()
        self._tool: str | None = None
        # the tool of each item of the layer's undo / redo history, kept in step with napari's history
        self._undo_tools: list[str] = []
        self._redo_tools: list[str] = []
        self._values: list[int] = []
        self._filling = False
        self._lesion_timer = QTimer(self)
        self._lesion_timer.setSingleShot(True)
        self._lesion_timer.setInterval(250)
        self._lesion_timer.timeout.connect(self._update_lesion_counts)
        self._lesion_counts: dict[int, int] = {}
        self._choice_timer = QTimer(self)
        self._choice_timer.setSingleShot(True)
        self._choice_timer.setInterval(0)
        self._choice_timer.timeout.connect(self._refresh_choices)

        layout = QVBoxLayout(self)
        form = QFormLayout()
        self.layer_combo = QComboBox()
        self.proposal_combo = QComboBox()
        self.image_combo = QComboBox()
        self.reference_combo = QComboBox()
        form.addRow("Reviewed labels", self.layer_combo)
        form.addRow("AI proposal", self.proposal_combo)
        form.addRow("Image", self.image_combo)
        form.addRow("Reference", self.reference_combo)
        layout.addLayout(form)
        self.grid = QTableWidget(0, len(COLUMNS))
        self.grid.setHorizontalHeaderLabels(list(COLUMNS))
        self.grid.verticalHeader().setVisible(False)
        self.grid.setMinimumHeight(280)
        layout.addWidget(self.grid, stretch=1)
        row = QHBoxLayout()
        self.changes_check = QCheckBox("show voxels added / removed vs AI")
        self.compare_button = QPushButton("Dice / HD95 vs reference")
        row.addWidget(self.changes_check)
        row.addWidget(self.compare_button)
        layout.addLayout(row)

        lesions = QGroupBox("Lesions of the selected label")
        lesion_layout = QVBoxLayout(lesions)
        self.lesion_grid = QTableWidget(0, 4)
        self.lesion_grid.setHorizontalHeaderLabels(["#", "mL", "longest axis mm", "mean"])
        self.lesion_grid.verticalHeader().setVisible(False)
        self.lesion_grid.setMaximumHeight(110)
        lesion_layout.addWidget(self.lesion_grid)
        nav = QHBoxLayout()
        self.prev_button = QPushButton("◀ previous")
        self.next_button = QPushButton("next ▶")
        nav.addWidget(self.prev_button)
        nav.addWidget(self.next_button)
        lesion_layout.addLayout(nav)
        layout.addWidget(lesions)

        tools = QGroupBox("Correct (the selected label; preview, then apply as one undo step)")
        tform = QFormLayout(tools)
        self.lower_spin = self._spin(-1024, 3000, 50)
        self.upper_spin = self._spin(-1024, 3000, 200)
        grow_row = QHBoxLayout()
        grow_row.addWidget(self.lower_spin)
        grow_row.addWidget(self.upper_spin)
        self.grow_button = QPushButton("grow from last point")
        grow_row.addWidget(self.grow_button)
        tform.addRow("Region grow (HU window)", grow_row)
        self.otsu_button = QPushButton("Otsu in last rectangle")
        tform.addRow(self.otsu_button)
        self.split_spin = self._spin(0.5, 100, 5.0)
        self.split_button = QPushButton("split touching lesions")
        split_row = QHBoxLayout()
        split_row.addWidget(self.split_spin)
        split_row.addWidget(self.split_button)
        tform.addRow("Min distance mm", split_row)
        self.islands_spin = self._spin(0.0, 1000, 0.5)
        self.islands_button = QPushButton("remove islands")
        islands_row = QHBoxLayout()
        islands_row.addWidget(self.islands_spin)
        islands_row.addWidget(self.islands_button)
        tform.addRow("Below mL", islands_row)
        self.largest_button = QPushButton("keep the largest component")
        tform.addRow(self.largest_button)
        apply_row = QHBoxLayout()
        self.apply_button = QPushButton("Apply")
        self.discard_button = QPushButton("Discard")
        apply_row.addWidget(self.apply_button)
        apply_row.addWidget(self.discard_button)
        tform.addRow(apply_row)
        self.tool_status = QLabel("")
        self.tool_status.setWordWrap(True)
        tform.addRow(self.tool_status)
        layout.addWidget(tools)

        export = QGroupBox("Export")
        eform = QFormLayout(export)
        self.reviewer_edit = QLineEdit()
        eform.addRow("Reviewer", self.reviewer_edit)
        self.export_button = QPushButton("Export…")
        eform.addRow(self.export_button)
        self.export_status = QLabel("")
        self.export_status.setWordWrap(True)
        eform.addRow(self.export_status)
        layout.addWidget(export)

        self.layer_combo.currentTextChanged.connect(lambda _t: self._choose())
        self.proposal_combo.currentTextChanged.connect(lambda _t: self._choose())
        self.image_combo.currentTextChanged.connect(lambda _t: self._choose())
        self.grid.cellClicked.connect(self._cell_clicked)
        self.grid.itemChanged.connect(self._item_changed)
        self.changes_check.toggled.connect(self.show_changes)
        self.compare_button.clicked.connect(lambda: self._guard(self.compare))
        self.prev_button.clicked.connect(lambda: self.goto_lesion(self.lesion_index - 1))
        self.next_button.clicked.connect(lambda: self.goto_lesion(self.lesion_index + 1))
        self.lesion_grid.cellClicked.connect(lambda r, _c: self.goto_lesion(r))
        self.grow_button.clicked.connect(lambda: self._guard(self._grow_from_points))
        self.otsu_button.clicked.connect(lambda: self._guard(self._otsu_from_shapes))
        self.split_button.clicked.connect(lambda: self._guard(lambda: self.propose("split")))
        self.islands_button.clicked.connect(lambda: self._guard(lambda: self.propose("islands")))
        self.largest_button.clicked.connect(lambda: self._guard(lambda: self.propose("largest")))
        self.apply_button.clicked.connect(lambda: self._guard(self.apply_pending))
        self.discard_button.clicked.connect(self.discard_pending)
        self.export_button.clicked.connect(self._export_clicked)
        for emitter in (napari_viewer.layers.events.inserted, napari_viewer.layers.events.removed):
            emitter.connect(lambda _e=None: self._refresh_choices(defer=True))
        self._refresh_choices()

    @staticmethod
    def _spin(lo: float, hi: float, value: float) -> QDoubleSpinBox:
        spin = QDoubleSpinBox()
        spin.setRange(lo, hi)
        spin.setDecimals(1)
        spin.setValue(value)
        return spin

    def _guard(self, fn: Any) -> None:
        try:
            fn()
        except MedsegError as exc:
            from napari.utils.notifications import show_error

            self.tool_status.setText(str(exc))
            show_error(str(exc))

    # ---- layer choice ----------------------------------------------------------------------------------------
    def _refresh_choices(self, *, defer: bool = False) -> None:
        """Refill the layer pickers; from a layer-list event, ``defer`` to the next event-loop turn (the list must
        not change inside its own event, and a plain Labels layer may be swapped for a ReviewLabels one)."""
        if defer:
            self._choice_timer.start()  # a child of this widget: it never fires after the widget is gone
            return
        labels = [layer.name for layer in _labels_layers(self.viewer)]
        images = [layer.name for layer in self.viewer.layers
                  if layer.__class__.__name__ == "Image" and METADATA_KEY in layer.metadata]
        for combo, names, prefer in ((self.layer_combo, labels, "Reviewed"),
                                     (self.proposal_combo, [_NONE, *labels], "AI proposal"),
                                     (self.image_combo, [_NONE, *images], None),
                                     (self.reference_combo, [_NONE, *labels], None)):
            current = combo.currentText()
            before = {combo.itemText(i) for i in range(combo.count())}
            combo.blockSignals(True)
            combo.clear()
            combo.addItems(names)
            if prefer in names and prefer not in before:  # a model run just made it: review that
                combo.setCurrentText(prefer)
            elif current in names:
                combo.setCurrentText(current)
            elif prefer in names:
                combo.setCurrentText(prefer)
            elif combo is self.image_combo and images:
                combo.setCurrentText(images[0])
            combo.blockSignals(False)
        self._choose()

    def _layer(self, combo: QComboBox) -> Any:
        name = combo.currentText()
        return self.viewer.layers[name] if name and name != _NONE and name in self.viewer.layers else None

    def _choose(self) -> None:
        layer, proposal, image = self._layer(self.layer_combo), self._layer(self.proposal_combo), self._layer(
            self.image_combo)
        if layer is self.layer and proposal is self.proposal and image is self.image and self.tally is not None:
            return
        if layer is not None and not hasattr(layer, "history_listeners"):
            layer = self._make_reviewable(layer)
        self._attach(layer, proposal if proposal is not layer else None, image)

    def _make_reviewable(self, layer: Any) -> Any:
        """Swap a plain Labels layer for a ReviewLabels copy (undo/redo reported, locks), in the same place."""
        from medseg_napari._layers import ReviewLabels

        index = list(self.viewer.layers).index(layer)
        new = ReviewLabels(np.asarray(layer.data), name=layer.name, scale=layer.scale, translate=layer.translate,
                           metadata=dict(layer.metadata), features=layer.features, colormap=layer.colormap,
                           opacity=layer.opacity)
        self.viewer.layers.remove(layer)
        self.viewer.layers.insert(index, new)
        return new

    def _attach(self, layer: Any, proposal: Any, image: Any) -> None:
        if self.layer is not None:
            for emitter, cb in ((self.layer.events.paint, self._on_paint), (self.layer.events.data, self._on_data)):
                emitter.disconnect(cb)
            if self._on_history in getattr(self.layer, "history_listeners", []):
                self.layer.history_listeners.remove(self._on_history)
        if self.proposal is not None:
            self.proposal.events.data.disconnect(self._on_data)
        self.layer, self.proposal, self.image = layer, proposal, image
        if layer is not None:
            layer.events.paint.connect(self._on_paint)
            layer.events.data.connect(self._on_data)
            layer.history_listeners.append(self._on_history)
        if proposal is not None:
            proposal.events.data.connect(self._on_data)
        self.rebuild()

    def _on_data(self, _event: Any = None) -> None:
        self.rebuild()

    def rebuild(self) -> None:
        """Recount everything from the layers (after a model run or a layer change; never per edit)."""
        from medseg_napari._layers import layer_table

        self.metrics.clear()
        self.lesions = []
        self._undo_tools, self._redo_tools = [], []
        if self.layer is None:
            self.tally = None
            self.grid.setRowCount(0)
            return
        data = np.asarray(self.layer.data)
        image = np.asarray(self.image.data) if self.image is not None and self.image.data.shape == data.shape else None
        proposal = np.asarray(self.proposal.data) if self.proposal is not None and \
            self.proposal.data.shape == data.shape else None
        info = self.layer.metadata[METADATA_KEY]
        voxel_ml = abs(float(np.linalg.det(np.asarray(info["affine"])[:3, :3]))) / 1000.0
        self.tally = LabelTally(data, voxel_volume_ml=voxel_ml, image=image, proposal=proposal)
        self.table = layer_table(self.layer)
        present = set(np.flatnonzero(self.tally.counts).tolist())
        if proposal is not None:
            present |= set(np.flatnonzero(self.tally.removed).tolist())
        table_values = list(self.table or ())
        # a model's few labels are all listed; a long table (e.g. TotalSegmentator's 117) lists those present
        self._values = sorted((set(table_values) if len(table_values) <= 20 else set()) | (present - {0}))
        self._lesion_counts = {}
        self._update_lesion_counts()
        self._fill_table()
        if self.changes_check.isChecked():
            self.show_changes(True)

    # ---- live statistics -------------------------------------------------------------------------------------
    def _record(self, action: str, changes_list: list[dict[int, list[int]]], tool: str | None) -> None:
        merged: dict[int, list[int]] = {}
        for changes in changes_list:
            for v, (g, lost) in changes.items():
                m = merged.setdefault(v, [0, 0])
                m[0] += g
                m[1] += lost
        if not merged:
            return
        label = int(self.layer.selected_label)
        self.edits.append(new_edit(tool or "paint", action, label, merged))
        for v in merged:
            if v and self.statuses.get(v, "not started") == "not started":
                self.statuses[v] = "in progress"
        new_values = [v for v in merged if v and v not in self._values]
        if new_values:
            self._values = sorted(set(self._values) | set(new_values))
            self._fill_table()
        else:
            self._refresh_rows(merged)
        lesion_values = [v for v in merged if self.table is not None and v in self.table
                         and self.table[v].kind == "lesion"]
        if lesion_values:
            self._lesion_timer.start()

    def _apply_atoms(self, atoms: list[Any], action: str) -> list[dict[int, list[int]]]:
        from medseg_napari._layers import atom_changes

        assert self.tally is not None
        out = []
        for flat, old, new in atom_changes(atoms, self.layer.data.shape, action):
            out.append(self.tally.apply_change(flat, old, new))
            self._update_changes_layer(flat, new)
        return out

    def _on_paint(self, event: Any) -> None:
        if self.tally is None:
            return
        mode = str(self.layer.mode)
        tool = self._tool or (mode if mode in ("paint", "fill", "erase", "polygon") else "edit")
        self._undo_tools.append(tool)
        del self._undo_tools[: -self.layer._history_limit]
        self._redo_tools.clear()
        self._record("apply", self._apply_atoms(list(event.value), "apply"), tool)

    def _on_history(self, action: str, atoms: list[Any]) -> None:
        if self.tally is None:
            return
        source, target = (self._undo_tools, self._redo_tools) if action == "undo" else (self._redo_tools,
                                                                                           self._undo_tools)
        tool = source.pop() if source else "edit"
        target.append(tool)
        self._record(action, self._apply_atoms(atoms, action), tool)

    def _update_lesion_counts(self) -> None:
        if self.tally is None or self.table is None:
            return
        data = np.asarray(self.layer.data)
        for v, lab in self.table.items():
            if lab.kind == "lesion":
                self._lesion_counts[v] = self.tally.lesion_count(data, v)
        self._refresh_rows({v: [0, 0] for v in self._lesion_counts})

    def rows(self) -> list[Any]:
        """The current review rows (medseg.review.LabelReviewRow), by label value."""
        assert self.tally is not None
        return [self.tally.row(v, self.table) for v in self._values]

    def _row_cells(self, v: int) -> list[str]:
        assert self.tally is not None
        r = self.tally.row(v, self.table)
        sd = "" if math.isnan(r.intensity_mean) else f"{r.intensity_mean:.1f} ± {r.intensity_std:.1f}"
        dice, hd95 = self.metrics.get(v, (math.nan, math.nan))
        lesions = str(self._lesion_counts[v]) if v in self._lesion_counts else ""
        return [f"{r.volume_ml:.2f}", f"{r.change_ml:+.2f}", sd, lesions,
                "" if math.isnan(dice) else f"{dice:.3f}", "" if math.isnan(hd95) else f"{hd95:.1f}"]

    def _fill_table(self) -> None:
        self._filling = True
        try:
            self.grid.clearContents()
            self.grid.setRowCount(0)
            self.grid.setRowCount(len(self._values))
            for row, v in enumerate(self._values):
                lab = self.table.get(v) if self.table is not None else None
                show = QTableWidgetItem()
                show.setFlags(Qt.ItemFlag.ItemIsUserCheckable | Qt.ItemFlag.ItemIsEnabled)
                show.setCheckState(Qt.CheckState.Unchecked if v in self.hidden else Qt.CheckState.Checked)
                lock = QTableWidgetItem()
                lock.setFlags(Qt.ItemFlag.ItemIsUserCheckable | Qt.ItemFlag.ItemIsEnabled)
                locked = v in getattr(self.layer, "locked_labels", set())
                lock.setCheckState(Qt.CheckState.Checked if locked else Qt.CheckState.Unchecked)
                colour = QTableWidgetItem()
                rgb = lab.color if lab else (150, 150, 150)
                colour.setBackground(QColor(*rgb))
                colour.setFlags(Qt.ItemFlag.ItemIsEnabled)
                name = QTableWidgetItem(lab.name if lab else f"label_{v}")
                name.setFlags(Qt.ItemFlag.ItemIsEnabled | Qt.ItemFlag.ItemIsSelectable)
                name.setData(Qt.ItemDataRole.UserRole, v)
                for col, item in enumerate((show, lock, colour, name)):
                    self.grid.setItem(row, col, item)
                status = QComboBox()
                status.addItems(list(REVIEW_STATUSES))
                status.setCurrentText(self.statuses.get(v, "not started"))
                status.currentTextChanged.connect(lambda s, val=v: self.statuses.__setitem__(val, s))
                self.grid.setCellWidget(row, COLUMNS.index("status"), status)
            self._refresh_rows({v: [0, 0] for v in self._values})
            self.grid.resizeColumnsToContents()
        finally:
            self._filling = False

    def _refresh_rows(self, values: Any) -> None:
        was = self._filling
        self._filling = True
        try:
            for v in values:
                if v not in self._values:
                    continue
                row = self._values.index(v)
                cells = self._row_cells(v)
                for col, text in zip((4, 5, 6, 7, 9, 10), cells, strict=True):
                    item = self.grid.item(row, col)
                    if item is None:
                        item = QTableWidgetItem()
                        item.setFlags(Qt.ItemFlag.ItemIsEnabled | Qt.ItemFlag.ItemIsSelectable)
                        self.grid.setItem(row, col, item)
                    item.setText(text)
                status = self.grid.cellWidget(row, COLUMNS.index("status"))
                if status is not None and status.currentText() != self.statuses.get(v, "not started"):
                    status.blockSignals(True)
                    status.setCurrentText(self.statuses.get(v, "not started"))
                    status.blockSignals(False)
        finally:
            self._filling = was

    def _item_changed(self, item: QTableWidgetItem) -> None:
        if self._filling or self.layer is None:
            return
        v = self._values[item.row()]
        checked = item.checkState() == Qt.CheckState.Checked
        if item.column() == 0:
            self.set_visible(v, checked)
        elif item.column() == 1:
            self.set_locked(v, checked)

    def set_visible(self, value: int, visible: bool) -> None:
        """Show or hide one label (its colour's alpha)."""
        from medseg_napari._layers import labels_kwargs

        (self.hidden.discard if visible else self.hidden.add)(value)
        self.layer.colormap = labels_kwargs(self.table, values=self._values, hidden=self.hidden)["colormap"]

    def set_locked(self, value: int, locked: bool) -> None:
        """Protect a label from painting, filling and the tools."""
        (self.layer.locked_labels.add if locked else self.layer.locked_labels.discard)(value)

    def _cell_clicked(self, row: int, column: int) -> None:
        if column in (0, 1) or row >= len(self._values):
            return
        self.select_label(self._values[row])

    def select_label(self, value: int) -> None:
        """Select a label for painting and centre the view on it; lesion labels list their lesions."""
        self.layer.selected_label = value
        assert self.tally is not None
        box = self.tally.box(value)
        if box is not None:
            data = np.asarray(self.layer.data[box])
            centre = np.argwhere(data == value).mean(axis=0) + np.array([s.start for s in box])
            self._centre(self.layer.data_to_world(centre))
        if self.table is not None and value in self.table and self.table[value].kind == "lesion":
            self.list_lesions(value)

    def _centre(self, world: Any) -> None:
        world = np.asarray(world, dtype=float)
        self.viewer.dims.set_point(range(3), tuple(world))
        self.viewer.scene.camera.center = tuple(world)

    # ---- lesions ---------------------------------------------------------------------------------------------
    def list_lesions(self, value: int) -> list[Any]:
        """Per-lesion rows of a label (medseg.stats.volume_stats on the exact grid)."""
        from medseg.stats import volume_stats
        from medseg_napari._tools import display_volume

        info = self.layer.metadata
        seg = display_volume(np.asarray(self.layer.data), info)
        seg = seg.with_array(seg.array, labels=self.table)
        image = display_volume(np.asarray(self.image.data), info, modality=self.image.metadata[METADATA_KEY].get(
            "modality")) if self.image is not None else None
        stats = volume_stats(seg, image, labels=[value], lesion_labels=[value])
        self.lesions = list(stats.lesions)
        self.lesion_grid.setRowCount(len(self.lesions))
        for row, les in enumerate(self.lesions):
            for col, text in enumerate((str(les.lesion_id), f"{les.volume_ml:.2f}", f"{les.longest_axis_mm:.1f}",
                                        "" if math.isnan(les.intensity_mean) else f"{les.intensity_mean:.0f}")):
                self.lesion_grid.setItem(row, col, QTableWidgetItem(text))
        self.lesion_index = -1
        return self.lesions

    def goto_lesion(self, index: int) -> None:
        """Centre the view on lesion ``index`` of the listed ones (wrapping around)."""
        if not self.lesions:
            return
        self.lesion_index = index % len(self.lesions)
        les = self.lesions[self.lesion_index]
        # the display Volume's affine is the layer's exact geometry: its RAS centroid maps to the viewer world
        self._centre(ras_to_world(les.centroid_mm))
        self.lesion_grid.selectRow(self.lesion_index)

    # ---- changes against the AI ------------------------------------------------------------------------------
    def show_changes(self, on: bool) -> None:
        """Overlay voxels added (green) and removed (red) against the AI proposal."""
        from napari.utils.colormaps import DirectLabelColormap

        layers = self.viewer.layers
        if not on or self.proposal is None or self.layer is None:
            if CHANGES_LAYER in layers:
                layers.remove(CHANGES_LAYER)
            return
        cur, ai = np.asarray(self.layer.data), np.asarray(self.proposal.data)
        diff = np.where(cur == ai, 0, np.where(cur != 0, 1, 2)).astype(np.uint8)
        colours = DirectLabelColormap(color_dict={0: (0, 0, 0, 0), 1: (0.1, 0.9, 0.1, 1), 2: (0.95, 0.1, 0.1, 1),
                                                  None: (0, 0, 0, 0)})
        if CHANGES_LAYER in layers:
            layers[CHANGES_LAYER].data = diff
        else:
            changes = self.viewer.add_labels(diff, name=CHANGES_LAYER, scale=self.layer.scale,
                                        translate=self.layer.translate, colormap=colours, opacity=0.8)
            changes.editable = False
            layers.selection.active = self.layer

    def _update_changes_layer(self, flat: np.ndarray, new: np.ndarray) -> None:
        if CHANGES_LAYER not in self.viewer.layers or self.proposal is None:
            return
        layer = self.viewer.layers[CHANGES_LAYER]
        ai = np.asarray(self.proposal.data).ravel()[flat]
        new = np.asarray(new).ravel()
        layer.data.ravel()[flat] = np.where(new == ai, 0, np.where(new != 0, 1, 2))
        layer.refresh()

    # ---- compare with a reference ----------------------------------------------------------------------------
    def compare(self) -> dict[int, tuple[float, float]]:
        """Dice and HD95 (mm) per label against the reference layer (medseg.metrics.evaluate)."""
        from medseg.metrics import evaluate
        from medseg_napari._layers import layer_volume

        ref = self._layer(self.reference_combo)
        if ref is None or self.layer is None:
            raise MedsegError("Choose a reference Labels layer first (e.g. the phantom truth).")
        result = evaluate(layer_volume(self.layer, labels=True), layer_volume(ref, labels=True))
        self.metrics = {m.value: (m.dice, m.hd95_mm) for m in result.labels}
        self._refresh_rows(list(self.metrics))
        return self.metrics

    # ---- tools -----------------------------------------------------------------------------------------------
    def _require(self) -> tuple[np.ndarray, int]:
        if self.layer is None:
            raise MedsegError("Choose the labels to review first.")
        label = int(self.layer.selected_label)
        if label == 0:
            raise MedsegError("Select a label (click its row) before using a correction tool.")
        return np.asarray(self.layer.data), label

    def _need_image(self) -> np.ndarray:
        if self.image is None or self.image.data.shape != self.layer.data.shape:
            raise MedsegError("This tool needs the image on the labels' grid: choose it under 'Image'.")
        return np.asarray(self.image.data)

    def propose(self, tool: str, **params: Any) -> Any:
        """Compute a tool's change and show it in the preview layer (``Apply`` writes it). Returns the change.

        ``tool``: "grow" (``seed_world``, ``lower``, ``upper``), "otsu" (``box_data``, ``foreground``), "split"
        (``min_distance_mm``), "islands" (``min_ml``), "largest".
        """
        from medseg_napari import _tools

        data, label = self._require()
        meta = self.layer.metadata
        locked = set(getattr(self.layer, "locked_labels", set()))
        if tool == "grow":
            seed = self.layer.world_to_data(params["seed_world"])
            change = _tools.grow_region(self._need_image(), data, meta, seed, label=label,
                                        lower=params.get("lower", self.lower_spin.value()),
                                        upper=params.get("upper", self.upper_spin.value()), locked=locked)
        elif tool == "otsu":
            change = _tools.otsu_box(self._need_image(), data, meta, params["box_data"], label=label,
                                     foreground=params.get("foreground", "bright"), locked=locked)
        elif tool == "split":
            change = _tools.split_lesions(data, meta, label=label,
                                          min_distance_mm=params.get("min_distance_mm", self.split_spin.value()))
        elif tool == "islands":
            change = _tools.remove_small_islands(data, meta, label=label,
                                                 min_ml=params.get("min_ml", self.islands_spin.value()))
        elif tool == "largest":
            change = _tools.keep_largest(data, meta, label=label)
        else:
            raise ValueError(f"Unknown tool {tool!r}; tools are grow, otsu, split, islands, largest.")
        self.pending = change
        self._show_preview(change)
        ml = self.tally.voxel_volume_ml if self.tally is not None else 0.0
        self.tool_status.setText(f"{change.tool}: +{change.add.size} / -{change.remove.size} voxels "
                                 f"({(change.add.size - change.remove.size) * ml:+.2f} mL). Apply or Discard.")
        return change

    def _show_preview(self, change: Any) -> None:
        preview = np.zeros(self.layer.data.shape, dtype=np.uint8)
        preview.ravel()[change.add] = 1
        preview.ravel()[change.remove] = 2
        layers = self.viewer.layers
        if PREVIEW_LAYER in layers:
            layers[PREVIEW_LAYER].data = preview
        else:
            from napari.utils.colormaps import DirectLabelColormap

            colours = DirectLabelColormap(color_dict={0: (0, 0, 0, 0), 1: (1, 1, 0, 1), 2: (1, 0, 1, 1),
                                                      None: (0, 0, 0, 0)})
            layer = self.viewer.add_labels(preview, name=PREVIEW_LAYER, scale=self.layer.scale,
                                      translate=self.layer.translate, colormap=colours, opacity=0.7)
            layer.editable = False
        layers.selection.active = self.layer

    def discard_pending(self) -> None:
        """Drop the previewed change."""
        self.pending = None
        if PREVIEW_LAYER in self.viewer.layers:
            self.viewer.layers.remove(PREVIEW_LAYER)
        self.tool_status.setText("")

    def apply_pending(self) -> None:
        """Write the previewed change into the reviewed labels as one undoable step."""
        from medseg_napari._tools import apply_change

        if self.pending is None:
            raise MedsegError("Nothing to apply: run a tool first.")
        change, self.pending = self.pending, None
        self._tool = change.tool
        try:
            apply_change(self.layer, change)
        finally:
            self._tool = None
        self.discard_pending()

    def _grow_from_points(self) -> None:
        points = [layer for layer in self.viewer.layers if layer.__class__.__name__ == "Points" and len(layer.data)]
        if not points:
            raise MedsegError("Add a Points layer and click a seed point inside the structure first.")
        world = points[-1].data_to_world(points[-1].data[-1])
        self.propose("grow", seed_world=world)

    def _otsu_from_shapes(self) -> None:
        shapes = [layer for layer in self.viewer.layers if layer.__class__.__name__ == "Shapes" and len(layer.data)]
        if not shapes:
            raise MedsegError("Add a Shapes layer and draw a rectangle around the structure first.")
        corners = np.asarray([shapes[-1].data_to_world(p) for p in shapes[-1].data[-1]])
        idx = np.asarray([self.layer.world_to_data(c) for c in corners])
        shape = self.layer.data.shape
        box = []
        for axis in range(3):
            lo, hi = int(np.floor(idx[:, axis].min() + 0.5)), int(np.floor(idx[:, axis].max() + 0.5)) + 1
            box.append((max(0, lo), min(shape[axis], max(hi, lo + 1))))
        self.propose("otsu", box_data=box)

    # ---- export ----------------------------------------------------------------------------------------------
    def _export_clicked(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Export folder")
        if folder:
            self._guard(lambda: self.export(folder, reviewer=self.reviewer_edit.text()))

    def export(self, folder: str | os.PathLike[str], *, reviewer: str) -> dict[str, str]:
        """Write the reviewed labels (NIfTI; a SEMIAUTOMATIC DICOM SEG for DICOM sources), a statistics CSV and the
        review record.

        Every written label file is read back and compared with the layer (labels and geometry) before success is
        reported. When the SEG writer refuses (e.g. a source with blank UIDs), the record and the status say why.
        Returns kind → path.

        Raises
        ------
        GeometryError
            If a written file does not read back identical.
        """
        from medseg.errors import GeometryError
        from medseg.io import detect_format, load_volume, save_volume
        from medseg.stats import volume_stats
        from medseg_napari._layers import layer_volume
        from medseg_napari._writer import write_seg

        if self.layer is None or self.tally is None:
            raise MedsegError("Choose the labels to review first.")
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        seg = layer_volume(self.layer, labels=True)
        files: dict[str, str] = {}
        nifti = save_volume(seg, out / "reviewed.nii.gz")
        back = load_volume(nifti)
        if not (back.same_grid(seg) and np.array_equal(back.array, seg.array) and back.labels == seg.labels):
            raise GeometryError(f"{nifti}: read back different from the reviewed labels; the export is not valid.")
        files["labels"] = str(nifti)
        image = layer_volume(self.image) if self.image is not None else None
        if image is not None and not image.same_grid(seg):
            image = None
        model = self.layer.metadata[METADATA_KEY].get("model")
        seg_note = None
        if seg.source is not None and seg.source.files and seg.source.sop_instance_uids and \
                detect_format(seg.source.files[0]) == "dicom":
            try:
                source = image if image is not None and image.source == seg.source else None
                files["dicom_seg"] = str(write_seg(seg, out / "reviewed_seg.dcm", source=source, model=model))
            except GeometryError:
                raise
            except MedsegError as exc:  # e.g. blank source UIDs or a label without a coded concept: say so
                seg_note = str(exc)
        stats_path = atomic_write_text(out / "statistics.csv", volume_stats(seg, image).to_csv())
        files["statistics"] = str(stats_path)
        record = review_record(self.tally, table=self.table, statuses=self.statuses, edits=self.edits,
                               reviewer=reviewer, started=self.started, model=model, files=files)
        record["dicom_seg_note"] = seg_note
        record_path = atomic_write_text(out / "review.json", json.dumps(record, indent=2) + "\n")
        files["review_record"] = str(record_path)
        note = f" DICOM SEG not written: {seg_note}" if seg_note else ""
        self.export_status.setText(f"Exported to {out} (read back and checked).{note}")
        return files
