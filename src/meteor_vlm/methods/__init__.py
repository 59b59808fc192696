"""Pruning methods: one file per method, a registry by name (`get("meteor")`)."""

from ..models.runtime import LLMMerge
from .base import REGISTRY, EncoderMerge, EncoderPoint, FusionPoint, NoPruning, PruningMethod, get, register
from .dart import DART
from .divprune import DivPrune
from .evoprune import EvoPrune
from .fastv import FastV
from .meteor import Meteor, scaled_llm_layers
from .prumerge import PruMerge
from .pyramiddrop import PyramidDrop
from .sparsevlm import SparseVLM
from .tome import ToMe
from .visionzip import VisionZip

__all__ = [
    "DART",
    "DivPrune",
    "REGISTRY",
    "EncoderMerge",
    "EncoderPoint",
    "EvoPrune",
    "FastV",
    "FusionPoint",
    "LLMMerge",
    "Meteor",
    "NoPruning",
    "PruningMethod",
    "PyramidDrop",
    "ToMe",
    "VisionZip",
    "PruMerge",
    "SparseVLM",
    "get",
    "register",
    "scaled_llm_layers",
]
