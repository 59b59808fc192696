"""The embedded default model: a small multi-encoder VLM trained here on the synthetic benchmark."""

from __future__ import annotations

from pathlib import Path

DEFAULT_DIR = Path(__file__).parent / "default_model"

__all__ = ["load_default", "has_default", "DEFAULT_DIR"]


def has_default() -> bool:
    """Whether this install carries the embedded checkpoint."""
    return (DEFAULT_DIR / "config.json").is_file() and (DEFAULT_DIR / "model.safetensors").is_file()


def load_default():
    """(model, processor) of the embedded default model, in eval mode on the CPU."""
    from .models import MultiEncoderProcessor, MultiEncoderVLM

    if not has_default():
        raise ValueError(
            f"the embedded default model is not in this install ({DEFAULT_DIR}); "
            "train it with `meteor train --export` or pass --model PATH"
        )
    return MultiEncoderVLM.from_pretrained(DEFAULT_DIR).eval(), MultiEncoderProcessor.from_pretrained(DEFAULT_DIR)
