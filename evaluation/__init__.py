"""Evaluation and export: MIL feature export, kNN, linear probe, segmentation fine-tuning."""
