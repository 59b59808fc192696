"""meteor-vlm: visual-token pruning for vision-language models.

    import meteor_vlm as mv
    model, processor = mv.testing.tiny_model()
    method = mv.Meteor.preset("paper-242")
    with method(model):
        out = model.generate(**inputs, max_new_tokens=8)
    method.stats   # tokens kept per stage, per sample
"""

from . import methods, ops, testing
from .calibration import calibrate, load_rank_table, save_rank_table
from .default import has_default, load_default
from .methods import DART, DivPrune, EvoPrune, FastV, Meteor, NoPruning, PruMerge, PruningMethod, PyramidDrop, SparseVLM, ToMe, VisionZip
from .models import ExpertSpec, MultiEncoderProcessor, MultiEncoderVLM, MultiEncoderVLMConfig
from .oracles import verify

__version__ = "0.1.0"

__all__ = [
    "DART",
    "DivPrune",
    "EvoPrune",
    "ExpertSpec",
    "FastV",
    "Meteor",
    "MultiEncoderProcessor",
    "MultiEncoderVLM",
    "MultiEncoderVLMConfig",
    "NoPruning",
    "PruningMethod",
    "PyramidDrop",
    "ToMe",
    "VisionZip",
    "PruMerge",
    "SparseVLM",
    "calibrate",
    "has_default",
    "load_default",
    "load_rank_table",
    "methods",
    "verify",
    "ops",
    "save_rank_table",
    "testing",
]
