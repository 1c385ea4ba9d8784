"""What `dipreg arms` runs: the arms (recipe + λ), the seeds, and the size settings (full or ``--quick``).

An arm is a recipe (a packaged name from ``dipreg.recipes`` or a YAML path) with, for a hinge arm (``dip_reg``,
``dip_reg_causal``, ``dip_reg_tuned``), one λ per arm;
it is trained through the same LightningCLI as `dipreg fit`, so every recipe setting applies. The settings object is
written to ``arms_config.json`` so that a resumed run can refuse to mix results of different settings.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

from dipreg.eval.degradation.operators import DegradeError, parse_ops
from dipreg.eval.degradation.presets import PRESETS
from dipreg.losses import TunedMarginHinge, WrongMarginHinge, loss_class
from dipreg.prompting import PromptFormat
from dipreg.recipes import load_recipe
from dipreg.stimuli import load_pairs
from dipreg.validation import validate_count

__all__ = [
    "ARM_RECIPES",
    "DEFAULT_ARMS",
    "HINGE_ARMS",
    "SETTING_FLAGS",
    "ArmSpec",
    "ArmsSettings",
    "build_arms",
    "check_seeds",
]

#: The arms without `--arms`: the three recipe arms of the paper (§6.1).
DEFAULT_ARMS: tuple[str, ...] = ("output_only", "late_only", "dip_reg")
#: Arms whose hinge weight λ is swept (`--lambdas`): one arm per λ, named ``<arm>_l<λ>``.
HINGE_ARMS: tuple[str, ...] = ("dip_reg", "dip_reg_causal", "dip_reg_tuned")
#: Every arm `dipreg arms` knows (each a packaged recipe of the same name).
ARM_RECIPES: tuple[str, ...] = ("output_only", "late_only", "dip_reg", "dip_reg_causal", "dip_reg_tuned")

#: Conditions every trained arm is evaluated under: clean plus the ``arms`` preset (the paper's Table 4 degradations,
#: late block drop and mid pruning (§5.3), and late deprivation α=0, whose flip rate is the "fragility" column).
DEFAULT_CONDITIONS = f"clean,{PRESETS['arms']}"


@dataclass(frozen=True)
class ArmSpec:
    """One trained arm: a name (``dip_reg_l0.2``), its recipe (a packaged name or a YAML path), the hinge
    weight λ (``None``: the recipe's), and the tuned lens its ``TunedMarginHinge`` reads (``None``: the recipe's)."""

    name: str
    recipe: str
    lam: float | None = None
    tuned_lens: str | None = None

    def recipe_config(self) -> dict[str, Any]:
        """The recipe as a dict with λ applied to every hinge (an aux loss whose ``class_path`` resolves to a
        :class:`~dipreg.losses.WrongMarginHinge` or a subclass) and ``tuned_lens`` to every
        :class:`~dipreg.losses.TunedMarginHinge`."""
        config = load_recipe(self.recipe)
        for spec in _aux_losses(config):
            cls = loss_class(spec["class_path"])
            if self.lam is not None and issubclass(cls, WrongMarginHinge):
                spec.setdefault("init_args", {})["weight"] = self.lam
            if self.tuned_lens is not None and issubclass(cls, TunedMarginHinge):
                spec.setdefault("init_args", {})["tuned_lens"] = self.tuned_lens
        return config

    def needs_tuned_lens(self) -> bool:
        """Whether the recipe trains with a :class:`~dipreg.losses.TunedMarginHinge` (or a subclass)."""
        specs = _aux_losses(load_recipe(self.recipe))
        return any(issubclass(loss_class(spec["class_path"]), TunedMarginHinge) for spec in specs)


def _aux_losses(config: dict[str, Any]) -> list[dict[str, Any]]:
    """A recipe's ``model.aux_losses`` entries (an empty list when it has none)."""
    return (config.get("model") or {}).get("aux_losses") or []


def build_arms(arms: list[str], lambdas: list[float]) -> list[ArmSpec]:
    """Expand arm names into specs; every hinge arm (:data:`HINGE_ARMS`) gives one arm per λ, named
    ``<arm>_l<λ>``. Unknown or repeated names raise a ValueError."""
    unknown = [a for a in arms if a not in ARM_RECIPES]
    if unknown:
        raise ValueError(f"Unknown arm(s) {unknown}; choose from: {', '.join(ARM_RECIPES)}.")
    if not arms:
        raise ValueError("Name at least one arm (--arms output_only,late_only,dip_reg).")
    if len(set(arms)) != len(arms):
        raise ValueError(f"--arms names an arm twice: {arms}.")
    specs: list[ArmSpec] = []
    for arm in arms:
        if arm in HINGE_ARMS:
            if not lambdas:
                raise ValueError(f"{arm} needs at least one λ (--lambdas 0.2).")
            bad = [lam for lam in lambdas if lam <= 0]
            if bad:
                raise ValueError(f"λ must be > 0 (λ = 0 is output_only), got {bad}.")
            specs += [ArmSpec(f"{arm}_l{lam:g}", arm, float(lam)) for lam in lambdas]
        else:
            specs.append(ArmSpec(arm, arm))
    return specs


def check_seeds(seeds: list[int]) -> list[int]:
    """Refuse an empty, repeated or out-of-range seed list (a seed is an integer in [0, 2**32 - 1])."""
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds must list distinct integers, got {seeds}.")
    for seed in seeds:
        validate_count(seed, "--seeds: every seed", 0)
        if seed >= 2**32:
            raise ValueError(f"--seeds: every seed must be < 2**32, got {seed}.")
    return list(seeds)


#: The `dipreg arms` flag of each :class:`ArmsSettings` field the command line sets (the others are Python-only).
SETTING_FLAGS: dict[str, str] = {
    "max_steps": "--steps",
    "eval_pairs": "--eval-pairs",
    "eval_limit": "--eval-limit",
    "conditions": "--conditions",
    "monitor_every": "--monitor-every",
}


def _name(field: str) -> str:
    flag = SETTING_FLAGS.get(field)
    return f"{field} ({flag})" if flag else field


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
    retention_ops: str = PRESETS["retention"]
    eval_pairs: str = "strict240"
    eval_limit: int | None = None
    conditions: str = DEFAULT_CONDITIONS
    nll_texts: int | None = None
    heldout_sets: str | None = None
    prompt: str = "raw"
    batch_eval: int = 32

    def __post_init__(self) -> None:
        """Check every size and spec when the settings are built (so before any folder is made or model loads)."""
        for field in ("max_steps", "batch_size", "monitor_limit", "retention_limit", "eval_limit"):
            value = getattr(self, field)
            if value is not None:
                validate_count(value, _name(field), 1, "or unset")
        validate_count(self.monitor_every, _name("monitor_every"))
        validate_count(self.batch_eval, _name("batch_eval"))
        if self.nll_texts is not None:
            validate_count(self.nll_texts, _name("nll_texts"), 0)
        PromptFormat(self.prompt)  # type: ignore[arg-type]  # an unknown style raises here
        for field in ("conditions", "retention_ops"):
            spec = ",".join(p.strip() for p in getattr(self, field).split(",") if p.strip() != "clean")
            if field == "conditions" and not spec.strip(","):
                continue  # clean only
            try:
                parse_ops(spec)
            except DegradeError as err:
                raise DegradeError(f"{_name(field)}: {err}") from err
        if self.heldout_sets is not None and not [s for s in self.heldout_sets.split(",") if s.strip()]:
            raise ValueError(f"heldout_sets must name at least one pair set or be None, got {self.heldout_sets!r}.")

    def check_pair_sets(self) -> None:
        """Load every pair set the run reads (a built-in name or a JSONL file), so a bad one fails first."""
        names = {
            "monitor_pairs": self.monitor_pairs,
            "retention_pairs": self.retention_pairs,
            "eval_pairs": self.eval_pairs,
        }
        for field, name in names.items():
            try:
                load_pairs(name)
            except FileNotFoundError as err:
                raise FileNotFoundError(f"{_name(field)}: {err}") from err
            except ValueError as err:
                raise ValueError(f"{_name(field)}: {err}") from err
        for name in (self.heldout_sets or "").split(","):
            if name.strip():
                load_pairs(name.strip())

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
