"""The tiny stage configs the training tests train with in seconds: the real offline BERT and LM,
small towers, on the session's SynthCT set (the ``synthct`` fixture in tests/conftest.py)."""
SIZE = (16, 32, 32)  # D, H, W of the session's SynthCT volumes (tests/conftest.py)


def tiny_clip_overrides(synthct, **extra) -> list[str]:
    """Stage 1 at test size: a narrow DCFormer-nano on the PyTorch path, the offline MiniLM."""
    values = {
        "model.vision": "dcformer_nano",
        "model.vision_options": "{dims: [4, 4, 8, 8, 16], backend: torch}",
        "model.image_size": f"[{', '.join(map(str, SIZE))}]",
        "model.projection_dim": 32,
        "model.max_text_length": 64,
        "data.path": str(synthct / "m3d_cap.json"),
        "data.eval_size": 2,
        "training.batch_size": 4,
        "training.learning_rate": "1e-3",
        "training.bf16": "false",
        "training.dataloader_num_workers": 0,
        "training.logging_steps": 1,
        "training.save_steps": 2,
        "training.eval_steps": 0,
        **extra,
    }
    return [f"{k}={v}" for k, v in values.items()]
