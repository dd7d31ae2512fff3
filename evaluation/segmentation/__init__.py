"""Segmentation fine-tuning of a pretrained encoder and sliding-window inference.

Modules: ``model`` (encoder + U-Net decoder), ``losses`` (soft Dice + CE), ``metrics`` (Dice/IoU),
``data`` (image/mask pairs, patch sampling, label fractions), ``nuclei_task`` (a derived-label nuclei
task from real H&E), ``train`` (fine-tuning loop), ``sliding_window`` (stitched inference over
images and whole-slide regions), ``slide_source`` (slide reads through ``preprocessing.readers``),
``overlays`` (mask/overlay PNGs), ``config`` (typed YAML config), ``cli`` (``sgcl eval seg``).
"""
