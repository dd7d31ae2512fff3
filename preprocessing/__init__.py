"""Tiling: slides -> tissue detection -> patch grid at a target um/px -> one HDF5 per slide."""
