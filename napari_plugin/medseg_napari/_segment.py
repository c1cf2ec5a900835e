"""The Segment dock widget: pick a model, run it in a worker thread with progress and Cancel, and put the result
into a read-only "AI proposal" layer and an editable "Reviewed" copy (never overwriting edits without asking)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
from qtpy.QtCore import QObject, Signal
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QMessageBox,
    QProgressBar,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from medseg.display import METADATA_KEY
from medseg.errors import MedsegError, SegmentationCancelledError

__all__ = ["AI_LAYER", "REVIEWED_LAYER", "SegmentWidget", "model_info"]

AI_LAYER = "AI proposal"
REVIEWED_LAYER = "Reviewed"
_OTHER = "model card or bundle folder…"


def model_info(card: Any) -> dict[str, Any]:
    """Name, version and weights sha256 of a model card (what the review record names)."""
    return {"name": card.name, "version": card.version,
            "weights_sha256": card.weights.sha256 if card.weights is not None else None}


class _Signals(QObject):
    progress = Signal(int, int)


class SegmentWidget(QWidget):
    """Run a medseg model on an image layer."""

    def __init__(self, napari_viewer: Any) -> None:
        from medseg_napari._view import install_orientation_letters

        super().__init__()
        self.viewer = napari_viewer
        install_orientation_letters(napari_viewer)
        self._cards: dict[str, Any] = {}
        self._cancel = threading.Event()
        self.worker: Any = None
        self.last_result: Any = None
        self._signals = _Signals()
        self._signals.progress.connect(self._on_progress)
        #: asks before replacing edited labels; tests replace it (returns True to replace)
        self.confirm_replace = self._ask_replace

        layout = QVBoxLayout(self)
        form = QFormLayout()
        self.image_combo = QComboBox()
        form.addRow("Image", self.image_combo)
        self.model_combo = QComboBox()
        form.addRow("Model", self.model_combo)
        self.model_label = QLabel()
        self.model_label.setWordWrap(True)
        form.addRow(self.model_label)
        self.device_combo = QComboBox()
        self.device_combo.addItems(["auto", "cpu", "cuda", "mps"])
        form.addRow("Device", self.device_combo)
        self.fast_check = QCheckBox("fast mode (mixed precision, skip empty windows)")
        self.tta_check = QCheckBox("test-time augmentation (8 flips, slower)")
        form.addRow(self.fast_check)
        form.addRow(self.tta_check)
        layout.addLayout(form)
        row = QHBoxLayout()
        self.run_button = QPushButton("Segment")
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        row.addWidget(self.run_button)
        row.addWidget(self.cancel_button)
        layout.addLayout(row)
        self.progress_bar = QProgressBar()
        self.progress_bar.setFormat("%v / %m windows")
        layout.addWidget(self.progress_bar)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        layout.addWidget(self.status)
        layout.addStretch()

        self.run_button.clicked.connect(self.run)
        self.cancel_button.clicked.connect(self.cancel)
        self.model_combo.currentTextChanged.connect(self._model_chosen)
        for emitter in (napari_viewer.layers.events.inserted, napari_viewer.layers.events.removed):
            emitter.connect(lambda _e=None: self._refresh_images())
        self._refresh_images()
        self._load_models()

    # ---- choices ---------------------------------------------------------------------------------------------
    def _refresh_images(self) -> None:
        current = self.image_combo.currentText()
        names = [layer.name for layer in self.viewer.layers
                 if layer.__class__.__name__ == "Image" and METADATA_KEY in layer.metadata]
        self.image_combo.blockSignals(True)
        self.image_combo.clear()
        self.image_combo.addItems(names)
        if current in names:
            self.image_combo.setCurrentText(current)
        self.image_combo.blockSignals(False)

    def _load_models(self) -> None:
        from medseg.models.registry import list_models

        listing = list_models()
        self._cards = {card.name: card for card in listing.cards}
        self.model_combo.clear()
        self.model_combo.addItems([*self._cards, _OTHER])
        if "phantom-abdomen-ct" in self._cards:
            self.model_combo.setCurrentText("phantom-abdomen-ct")

    def add_model(self, path: str | Path) -> str:
        """Add a model card file or bundle folder to the picker and select it; returns its name."""
        from medseg.models.registry import find_model

        card = find_model(Path(path))
        self._cards[card.name] = card
        if self.model_combo.findText(card.name) < 0:
            self.model_combo.insertItem(self.model_combo.count() - 1, card.name)
        self.model_combo.setCurrentText(card.name)
        return str(card.name)

    def _model_chosen(self, name: str) -> None:
        if name == _OTHER:
            path = QFileDialog.getExistingDirectory(self, "MONAI bundle folder") or QFileDialog.getOpenFileName(
                self, "Model card", filter="Model cards (*.yaml *.yml)")[0]
            if path:
                try:
                    self.add_model(path)
                except MedsegError as exc:
                    self._say(str(exc), error=True)
            return
        card = self._cards.get(name)
        if card is None:
            self.model_label.setText("")
            return
        labels = ", ".join(lab.name for lab in (card.labels or {}).values()) if card.labels else "?"
        sha = card.weights.sha256 if card.weights is not None and card.weights.sha256 else "none (weight-free)"
        self.model_label.setText(f"version {card.version} · labels: {labels} · weights sha256: {sha}")

    # ---- running ---------------------------------------------------------------------------------------------
    def _image_layer(self) -> Any:
        name = self.image_combo.currentText()
        layers = self.viewer.layers  # a LayerList: no .get()
        return layers[name] if name in layers else None  # noqa: SIM401

    def options(self) -> Any:
        """The inference options the widget's settings give."""
        from medseg.inference import InferenceOptions

        device = None if self.device_combo.currentText() == "auto" else self.device_combo.currentText()
        if self.fast_check.isChecked():
            return InferenceOptions.fast(device=device, tta=self.tta_check.isChecked())
        return InferenceOptions(device=device, tta=self.tta_check.isChecked())

    def run(self) -> Any:
        """Start a segmentation of the chosen image in a worker thread; returns the worker (None if not started)."""
        from napari.qt.threading import create_worker

        from medseg.display import volume_from_layer

        layer = self._image_layer()
        card = self._cards.get(self.model_combo.currentText())
        if layer is None or card is None:
            self._say("Choose an image opened with medseg and a model first.", error=True)
            return None
        volume = volume_from_layer(layer.data, layer.metadata)
        options = self.options()
        self._cancel.clear()
        self.progress_bar.setRange(0, 1)
        self.progress_bar.setValue(0)
        self.run_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self._say(f"Segmenting {layer.name} with {card.name}…")

        def work() -> Any:
            from medseg.inference import Segmenter

            return Segmenter(card, options=options).segment(
                volume, progress=self._signals.progress.emit, cancel=self._cancel.is_set)

        self.worker = create_worker(work, _ignore_errors=True)  # errors are shown by _on_error
        self.worker.returned.connect(lambda seg: self._on_result(seg, layer))
        self.worker.errored.connect(self._on_error)
        self.worker.finished.connect(self._on_finished)
        self.worker.start()
        return self.worker

    def cancel(self) -> None:
        """Stop the running segmentation before its next batch of windows."""
        self._cancel.set()
        self._say("Cancelling…")

    def _on_progress(self, done: int, total: int) -> None:
        self.progress_bar.setRange(0, max(total, 1))
        self.progress_bar.setValue(done)

    def _on_finished(self) -> None:
        self.run_button.setEnabled(True)
        self.cancel_button.setEnabled(False)

    def _on_error(self, exc: BaseException) -> None:
        if isinstance(exc, SegmentationCancelledError):
            self._say("Segmentation cancelled; nothing was changed.")
        elif isinstance(exc, MedsegError):
            self._say(str(exc), error=True)
        else:
            self._say(f"Segmentation failed ({type(exc).__name__}: {exc}).", error=True)

    def _say(self, text: str, *, error: bool = False) -> None:
        self.status.setText(text)
        if error:
            from napari.utils.notifications import show_error

            show_error(text)

    def _ask_replace(self) -> bool:
        answer = QMessageBox.question(
            self, "Replace reviewed labels?",
            f"The '{REVIEWED_LAYER}' layer holds your edits. Replace it with the new result (your edits are lost)? "
            f"Choose No to keep your edits; the new result is in '{AI_LAYER}' either way.")
        return bool(answer == QMessageBox.StandardButton.Yes)

    def _on_result(self, seg: Any, image_layer: Any) -> None:
        from medseg_napari._layers import ReviewLabels, labels_layer_data

        self.last_result = seg
        data, kwargs, _ = labels_layer_data(seg.labels, AI_LAYER)
        kwargs["metadata"][METADATA_KEY]["model"] = model_info(seg.card)
        layers = self.viewer.layers
        if AI_LAYER in layers:
            ai = layers[AI_LAYER]
            ai.metadata = kwargs["metadata"]
            ai.features = kwargs["features"]
            ai.colormap = kwargs["colormap"]
            ai.data = data
        else:
            ai = ReviewLabels(data, **kwargs)
            ai.editable = False
            ai.opacity = 0.4
            ai.visible = False
            layers.append(ai)
        kwargs = {**kwargs, "name": REVIEWED_LAYER}
        kwargs["metadata"] = {METADATA_KEY: dict(kwargs["metadata"][METADATA_KEY])}
        if REVIEWED_LAYER in layers:
            reviewed = layers[REVIEWED_LAYER]
            edited = bool(getattr(reviewed, "_undo_history", None))
            if edited and not self.confirm_replace():
                self._say(f"Kept your edits in '{REVIEWED_LAYER}'; the new result is in '{AI_LAYER}'.")
                return
            reviewed.metadata = kwargs["metadata"]
            reviewed.features = kwargs["features"]
            reviewed.colormap = kwargs["colormap"]
            if hasattr(reviewed, "reset_history"):
                reviewed.reset_history()
            reviewed.data = np.array(data, copy=True)
        else:
            layers.append(ReviewLabels(np.array(data, copy=True), **kwargs))
        layers.selection.active = layers[REVIEWED_LAYER]
        t = seg.timings_s.get("total", float("nan"))
        self._say(f"{seg.model} on {seg.device}: {len(seg.labels.labels or ())} labels in {t:.1f} s.")
