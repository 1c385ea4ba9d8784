"""Stimuli: minimal pairs (record type, built-in sets, JSONL I/O, single-token audit) and natural vignettes."""

from .generate import generate_core, generate_role_binding
from .jsonl import BUILTIN_SETS, load_pairs, save_pairs
from .schema import SAFETY_CATEGORIES, MinimalPair, StimulusError
from .single_token import audit_single_token, candidate_token_ids
from .vignettes import VIGNETTE_SETS, Vignette, balanced_subset, load_vignettes

__all__ = [
    "BUILTIN_SETS",
    "SAFETY_CATEGORIES",
    "VIGNETTE_SETS",
    "MinimalPair",
    "StimulusError",
    "Vignette",
    "audit_single_token",
    "balanced_subset",
    "candidate_token_ids",
    "generate_core",
    "generate_role_binding",
    "load_pairs",
    "load_vignettes",
    "save_pairs",
]
