"""Minimal-pair stimuli: the record type, built-in sets, JSONL I/O and the single-token audit."""

from .audit import audit_single_token, candidate_token_ids
from .generate import generate_core, generate_role_binding
from .jsonl import BUILTIN_SETS, load_pairs, save_pairs
from .schema import SAFETY_CATEGORIES, MinimalPair, StimulusError

__all__ = [
    "BUILTIN_SETS",
    "SAFETY_CATEGORIES",
    "MinimalPair",
    "StimulusError",
    "audit_single_token",
    "candidate_token_ids",
    "generate_core",
    "generate_role_binding",
    "load_pairs",
    "save_pairs",
]
