"""napari plugin for medseg (npe2 manifest: napari.yaml)."""
