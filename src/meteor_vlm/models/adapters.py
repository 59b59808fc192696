"""Which models a pruning method can be attached to, and what stands in for each of them.

`with method(model)` asks `adapt(model)` for a *target*: an object with what the methods' `setup` reads
(`runners`, `expert_names`, `num_llm_layers`, `config.{rank_table, fusion, text_config}`) and a
`pruning(method)` context manager that runs the model with the method inside the block and leaves it
exactly as it was afterwards. The project's `MultiEncoderVLM` is its own target; a stock transformers
LLaVA or LLaVA-NeXT gets a `LlavaAdapter` / `LlavaNextAdapter` (`models/llava.py`), which patches that one
instance while the block runs.
"""

from __future__ import annotations

__all__ = ["adapt", "SUPPORTED"]

SUPPORTED = ("meteor_vlm.MultiEncoderVLM", "transformers' LlavaForConditionalGeneration",
             "LlavaNextForConditionalGeneration")


def adapt(model, method_name: str = "a pruning method"):
    """The target `method_name` runs on for `model`; ValueError naming the class if it is not supported.
    A `LlavaAdapter` passed in is returned as it is, so `with method(adapter)` runs on the adapter a caller
    holds (`meteor speed` times its parts)."""
    from .llava import LlavaAdapter, llava_adapter
    from .vlm import MultiEncoderVLM

    if isinstance(model, (MultiEncoderVLM, LlavaAdapter)):  # an adapter made earlier serves as itself
        return model
    adapter = llava_adapter(model)
    if adapter is not None:
        return adapter
    raise ValueError(f"unsupported model class {type(model).__name__}: {method_name} runs on {', '.join(SUPPORTED)}")
