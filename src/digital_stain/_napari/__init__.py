"""The napari widgets: a thin Qt layer over the library."""
