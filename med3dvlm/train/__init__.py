"""Training: one module per task (``python -m med3dvlm.train.seg``: segmentation)."""
