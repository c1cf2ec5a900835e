"""Orientation letters on the canvas, CT window presets and the three planes, one click each."""

from __future__ import annotations

from typing import Any

from qtpy.QtWidgets import QGridLayout, QLabel, QPushButton, QVBoxLayout, QWidget

from medseg.display import CT_WINDOWS, METADATA_KEY, orientation_letters, window_limits

__all__ = ["PLANES", "ViewWidget", "apply_window", "install_orientation_letters", "show_plane"]

#: World axes (rows, columns) each plane draws in the medseg world (w0, w1, w2) = (-z, -y, -x).
PLANES = {"axial": (1, 2), "coronal": (0, 2), "sagittal": (0, 1)}
_POSITIONS = {"top": "top_center", "bottom": "bottom_center", "left": "middle_left", "right": "middle_right"}
_KEY = "medseg_orientation_"


def _update_letters(viewer: Any) -> None:
    overlays = viewer.canvas.overlays
    shown = viewer.dims.ndisplay == 2 and viewer.dims.ndim == 3 and any(
        METADATA_KEY in layer.metadata for layer in viewer.layers)
    letters = orientation_letters(tuple(viewer.dims.displayed)) if shown else {}
    for side in _POSITIONS:
        overlay = overlays[_KEY + side]
        overlay.text = letters.get(side, "")
        overlay.visible = bool(shown)


def install_orientation_letters(viewer: Any) -> None:
    """Patient directions (A/P, R/L, S/I) at the canvas edges of 2D views of medseg layers (idempotent)."""
    from napari.components.overlays import TextOverlay

    overlays = viewer.canvas.overlays
    if _KEY + "top" in overlays:
        return
    for side, position in _POSITIONS.items():
        overlays[_KEY + side] = TextOverlay(text="", position=position, font_size=14, color="yellow", visible=False)
    for emitter in (viewer.dims.events.order, viewer.dims.events.ndisplay, viewer.layers.events.inserted,
                    viewer.layers.events.removed):
        emitter.connect(lambda _e=None: _update_letters(viewer))
    _update_letters(viewer)


def apply_window(viewer: Any, name: str) -> int:
    """Set a CT window preset on every image layer medseg opened that is CT or of unknown modality; returns how many
    layers changed."""
    lo, hi = window_limits(name)
    n = 0
    for layer in viewer.layers:
        info = layer.metadata.get(METADATA_KEY)
        if info and (info.get("modality") or "CT").upper() == "CT" and layer.__class__.__name__ == "Image":
            layer.contrast_limits_range = (min(lo, layer.contrast_limits_range[0]),
                                           max(hi, layer.contrast_limits_range[1]))
            layer.contrast_limits = (lo, hi)
            n += 1
    return n


def show_plane(viewer: Any, plane: str) -> None:
    """Show the axial, coronal or sagittal plane (in 2D)."""
    rows, cols = PLANES[plane]
    slice_axis = ({0, 1, 2} - {rows, cols}).pop()
    viewer.dims.ndisplay = 2
    viewer.dims.order = (slice_axis, rows, cols)


class ViewWidget(QWidget):
    """Window presets (soft tissue, liver, lung, bone) and planes (axial, coronal, sagittal)."""

    def __init__(self, napari_viewer: Any) -> None:
        super().__init__()
        self.viewer = napari_viewer
        install_orientation_letters(napari_viewer)
        layout = QVBoxLayout(self)
        layout.addWidget(QLabel("CT window"))
        grid = QGridLayout()
        self.window_buttons: dict[str, QPushButton] = {}
        for n, name in enumerate(CT_WINDOWS):
            level, width = CT_WINDOWS[name]
            button = QPushButton(f"{name} (W{width:g} L{level:g})")
            button.clicked.connect(lambda _c=False, nm=name: apply_window(self.viewer, nm))
            grid.addWidget(button, n // 2, n % 2)
            self.window_buttons[name] = button
        layout.addLayout(grid)
        layout.addWidget(QLabel("Plane"))
        planes = QGridLayout()
        self.plane_buttons: dict[str, QPushButton] = {}
        for n, plane in enumerate(PLANES):
            button = QPushButton(plane)
            button.clicked.connect(lambda _c=False, p=plane: show_plane(self.viewer, p))
            planes.addWidget(button, 0, n)
            self.plane_buttons[plane] = button
        layout.addLayout(planes)
        layout.addStretch()
