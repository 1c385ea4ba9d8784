"""Hinges shaped like lenses: one default window, a registry by lens name, and `dipreg arms` recognising a hinge
by its type (a subclass of WrongMarginHinge), whatever its class is called."""

from __future__ import annotations

import inspect

import pytest
import yaml

from dipreg.eval.arms.plan import ArmSpec
from dipreg.losses import (
    HINGE_WINDOW,
    HINGES,
    AuxLoss,
    CausalMarginHinge,
    TunedMarginHinge,
    WrongMarginHinge,
    loss_class,
)


class Penalty(WrongMarginHinge):
    """A user's hinge under a name that is none of dipreg's: it is still a hinge, so an arm's λ applies to it."""


class TunedPenalty(TunedMarginHinge):
    """A user's tuned hinge: it reads a tuned lens, so an arm gives it the lens."""


class NotAWrongMarginHinge(AuxLoss):
    """Named like a hinge, but not one: an arm's λ must leave it alone."""

    def __call__(self, view):
        raise NotImplementedError


def test_every_hinge_defaults_to_the_one_window_of_the_paper():
    assert HINGE_WINDOW == (0.30, 0.85)
    assert set(HINGES) == {"logit", "causal", "tuned"}
    for cls in HINGES.values():
        assert inspect.signature(cls).parameters["window"].default == (0.30, 0.85)
    assert HINGES["causal"] is CausalMarginHinge and issubclass(HINGES["tuned"], WrongMarginHinge)


def test_loss_class_resolves_dotted_paths_and_bare_names_and_names_what_it_cannot_find():
    assert loss_class("dipreg.losses.CausalMarginHinge") is CausalMarginHinge
    assert loss_class("TunedMarginHinge") is TunedMarginHinge
    assert loss_class(f"{__name__}.Penalty") is Penalty
    with pytest.raises(ValueError, match=r"dipreg\.losses\.NoSuchHinge"):
        loss_class("dipreg.losses.NoSuchHinge")
    with pytest.raises(ValueError, match="'NoSuchHinge'"):
        loss_class("NoSuchHinge")


def test_an_arm_applies_its_lambda_and_tuned_lens_by_the_hinges_type_not_its_name(tmp_path):
    recipe = {
        "model": {
            "aux_losses": [
                {"class_path": f"{__name__}.Penalty", "init_args": {"weight": 1.0}},
                {"class_path": f"{__name__}.TunedPenalty", "init_args": {"weight": 1.0}},
                {"class_path": f"{__name__}.NotAWrongMarginHinge", "init_args": {"weight": 1.0}},
            ]
        }
    }
    path = tmp_path / "user.yaml"
    path.write_text(yaml.safe_dump(recipe))
    arm = ArmSpec("user_l0.5", str(path), lam=0.5, tuned_lens="/runs/tl.pt")
    penalty, tuned, other = arm.recipe_config()["model"]["aux_losses"]
    assert penalty["init_args"] == {"weight": 0.5}
    assert tuned["init_args"] == {"weight": 0.5, "tuned_lens": "/runs/tl.pt"}
    assert other["init_args"] == {"weight": 1.0}
    assert arm.needs_tuned_lens()
    del recipe["model"]["aux_losses"][1]
    path.write_text(yaml.safe_dump(recipe))
    assert not ArmSpec("user", str(path)).needs_tuned_lens()
