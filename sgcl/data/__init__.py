"""Pretraining data: the patch dataset over HDF5 files, its resumable sampler, spatial neighbours."""
