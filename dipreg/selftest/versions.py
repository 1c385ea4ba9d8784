"""The library versions the self-check found, and the versions dipreg needs (its declared dependencies)."""

from __future__ import annotations

import platform
from importlib import metadata
from typing import Any

import torch

#: What dipreg needs on the GPU machine (pyproject's dependencies; accelerate only for device maps).
REQUIRED: dict[str, str] = {
    "torch": ">=2.4",
    "transformers": ">=4.56",
    "peft": ">=0.13",
    "lightning": ">=2.4",
    "torchmetrics": ">=1.4",
    "tensorboard": ">=2.15",
    "scipy": ">=1.11",
    "rich": ">=13",
    "accelerate": ">=1.0 (optional: device maps and offload)",
}


def versions() -> dict[str, Any]:
    """Installed version of each library in :data:`REQUIRED` (``None`` when missing), the requirements, Python,
    CUDA and the GPU name."""
    found: dict[str, str | None] = {}
    for name in REQUIRED:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "found": found,
        "required": REQUIRED,
        "python": platform.python_version(),
        "cuda": torch.version.cuda,
        "gpu": gpu,
    }
