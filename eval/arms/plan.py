"""What `dipreg arms` runs: the arms (recipe + λ), the seeds, and the size settings (full or ``--quick``).

An arm is a recipe (a packaged name from ``dipreg.recipes`` or a YAML path) with, for ``dip_reg``, one λ per arm;
it is trained through the same LightningCLI as `dipreg fit`, so every recipe setting applies. The settings object is
written to ``arms_config.json`` so that a resumed run can refuse to mix results of different settings.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

from dipreg.recipes import load_recipe

__all__ = ["ARM_RECIPES", "ArmSpec", "ArmsSettings", "build_arms"]

#: The three recipe arms of the paper (§6.1); ``dip_reg`` expands to one arm per λ.
ARM_RECIPES: tuple[str, ...] = ("output_only", "late_only", "dip_reg")

#: Conditions every trained arm is evaluated under: clean plus the paper's Table 4 degradations, late block
#: drop and mid pruning (§5.3), and late deprivation α=0, whose flip rate is the "fragility" column.
DEFAULT_CONDITIONS = "clean,rtn:bits=4,rtn:bits=3,late_svd:rank=64,mid_svd:rank=64,late_drop,mid_prune,deprive:alpha=0"


@dataclass(frozen=True)
class ArmSpec:
    """One trained arm: a name (``dip_reg_l0.2``), its recipe (a packaged name or a YAML path), and the hinge
    weight λ (``None``: the recipe's)."""

    name: str
    recipe: str
    lam: float | None = None

    def recipe_config(self) -> dict[str, Any]:
        """The recipe as a dict with λ applied to every ``WrongMarginHinge``."""
        config = load_recipe(self.recipe)
        if self.lam is not None:
            for spec in (config.get("model") or {}).get("aux_losses") or []:
                if spec["class_path"].endswith("WrongMarginHinge"):
                    spec.setdefault("init_args", {})["weight"] = self.lam
        return config


def build_arms(arms: list[str], lambdas: list[float]) -> list[ArmSpec]:
    """Expand arm names into specs; ``dip_reg`` gives one arm per λ. Unknown names raise a ValueError."""
    unknown = [a for a in arms if a not in ARM_RECIPES]
    if unknown:
        raise ValueError(f"Unknown arm(s) {unknown}; choose from: {', '.join(ARM_RECIPES)}.")
    if not arms:
        raise ValueError("Name at least one arm (--arms output_only,late_only,dip_reg).")
    specs: list[ArmSpec] = []
    for arm in arms:
        if arm == "dip_reg":
            if not lambdas:
                raise ValueError("dip_reg needs at least one λ (--lambdas 0.2).")
            bad = [lam for lam in lambdas if lam <= 0]
            if bad:
                raise ValueError(f"λ must be > 0 (λ = 0 is output_only), got {bad}.")
            specs += [ArmSpec(f"dip_reg_l{lam:g}", "dip_reg", float(lam)) for lam in lambdas]
        else:
            specs.append(ArmSpec(arm, arm))
    return specs


@dataclass(frozen=True)
class ArmsSettings:
    """Sizes of one `dipreg arms` run. :meth:`quick` shrinks every size for a CI-sized smoke run.

    Attributes:
        max_steps: training steps per arm (``None``: the recipe's).
        batch_size: training contexts per step (``None``: the recipe's).
        monitor_pairs, monitor_limit: DipMonitor probe set (held out from training) and how many of its pairs.
        monitor_every: probe every N optimizer steps (logit + causal lens).
        retention_pairs, retention_limit, retention_ops: CompressionRetention at the end of training.
        eval_pairs, eval_limit: the evaluation set of every arm (the paper's 240-item strict set).
        conditions: ``clean`` plus `dipreg degrade` operator specs.
        nll_texts: texts of the general corpus used for the NLL capability-tax proxy (``None``: all).
        heldout_sets: comma-separated sets of the recipe's HeldOutEval after training (``None``: the recipe's
            ``heldout.sets``).
        prompt: prompt format (the recipes train on raw prompts).
        batch_eval: contexts per evaluation forward.
    """

    max_steps: int | None = None
    batch_size: int | None = None
    monitor_pairs: str = "comp_loose"
    monitor_limit: int | None = 64
    monitor_every: int = 15
    retention_pairs: str = "comp_strict"
    retention_limit: int | None = None
    retention_ops: str = "mid_svd:rank=64,late_svd:rank=64,rtn:bits=3"
    eval_pairs: str = "strict240"
    eval_limit: int | None = None
    conditions: str = DEFAULT_CONDITIONS
    nll_texts: int | None = None
    heldout_sets: str | None = None
    prompt: str = "raw"
    batch_eval: int = 32

    @classmethod
    def quick(cls) -> ArmsSettings:
        """A smoke run: a few steps, small probe/eval sets, every condition still evaluated."""
        return cls(
            max_steps=4,
            batch_size=8,
            monitor_limit=8,
            monitor_every=2,
            retention_limit=8,
            retention_ops="mid_svd:rank=64",
            eval_limit=24,
            nll_texts=4,
            heldout_sets="comp_strict",  # 25 pairs instead of the recipes' three sets (407 pairs)
        )

    def with_overrides(self, **changes: Any) -> ArmsSettings:
        """A copy with the non-``None`` ``changes`` applied."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready settings."""
        return asdict(self)
