"""Whole slides: the run, its units and their schedulers (threads, dask.distributed), the OME-Zarr store."""
