"""Where pruning meets models: the multi-encoder VLM, expert runners, the LLM runtime, the processor."""

from .experts import EXPERT_KINDS, ExpertSpec
from .processor import MultiEncoderProcessor, build_word_tokenizer
from .vlm import MultiEncoderVLM, MultiEncoderVLMConfig, VisualTokens

__all__ = ["EXPERT_KINDS", "ExpertSpec", "MultiEncoderProcessor", "MultiEncoderVLM", "MultiEncoderVLMConfig", "VisualTokens", "build_word_tokenizer"]
