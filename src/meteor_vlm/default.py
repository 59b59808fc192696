"""The embedded models: small multi-encoder VLMs trained here on the synthetic benchmark.

"default" (the one `meteor demo` runs) is "cnn-words": an LLM whose phase 2 read only the CNN expert's visual
words (README, "One expert's words in phase 2"). "all-words" is the earlier default, whose phase 2 read every
expert's words: the same vision side, a weaker LLM; it is carried so that the figures measured on it can be
reproduced without retraining it.
"""

from __future__ import annotations

from pathlib import Path

DEFAULT_DIR = Path(__file__).parent / "cnn_words_model"
EMBEDDED = {"default": DEFAULT_DIR, "cnn-words": DEFAULT_DIR, "all-words": Path(__file__).parent / "all_words_model"}

__all__ = ["load_default", "has_default", "DEFAULT_DIR", "EMBEDDED"]


def _folder(name: str) -> Path:
    if name not in EMBEDDED:
        raise ValueError(f"unknown embedded model {name!r}; the embedded ones are {', '.join(EMBEDDED)}")
    return EMBEDDED[name]


def has_default(name: str = "default") -> bool:
    """Whether this install carries the embedded checkpoint `name` (see `EMBEDDED`)."""
    folder = _folder(name)
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def load_default(name: str = "default"):
    """(model, processor) of the embedded model `name` (see `EMBEDDED`), in eval mode on the CPU."""
    from .models import MultiEncoderProcessor, MultiEncoderVLM

    folder = _folder(name)
    if not has_default(name):
        raise ValueError(
            f"the embedded model {name!r} is not in this install ({folder}); "
            "train it with `meteor train --export` or pass --model PATH"
        )
    return MultiEncoderVLM.from_pretrained(folder).eval(), MultiEncoderProcessor.from_pretrained(folder)
