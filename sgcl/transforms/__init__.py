"""View generation: crop policies, photometric augmentation, multi-crop, view geometry."""
