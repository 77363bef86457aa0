"""Staining: the settings, the model, the kernel, tiling, lazy chunks and their background worker, out-of-memory steps."""
