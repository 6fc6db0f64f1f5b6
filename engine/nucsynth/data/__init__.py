"""Data preparation: patch tiling and magnification change, stain normalization and the
torch dataset with geometric augmentation.

Submodules are imported on demand (``nucsynth.data.dataset`` imports torch; tiling and
stain normalization do not).
"""
