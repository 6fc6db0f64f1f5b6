"""Evaluation of synthetic data: image-quality distances, label fidelity and the downstream segmenter protocol."""
