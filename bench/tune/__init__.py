"""Tile sweeps on a CUDA device: time the candidates the static analysis ranks."""
