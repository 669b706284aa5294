"""One operation or step timed against its baselines: the fused conv, the SigLIP loss,
preprocessing, a training step."""
