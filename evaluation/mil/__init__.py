"""Slide-level multiple-instance learning on per-slide feature bags (``sgcl eval mil``).

One concept per module: :mod:`.data` (feature folders, the labels CSV, bags streamed from disk),
:mod:`.models` (mean pooling, gated-attention ABMIL, CLAM-SB-style attention with instance
clustering), :mod:`.folds` (patient-level folds), :mod:`.train` (one fold's training loop),
:mod:`.report` (metrics with patient-bootstrap CIs, CSVs, plots), :mod:`.scores` (per-patch scores of
a saved model, for heatmaps) and :mod:`.cli` (the command). See docs/mil.md.
"""
