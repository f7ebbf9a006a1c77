"""Semantic segmentation on visionmlp backbones: data, networks, metrics, training loop, ``visionmlp segment``."""
