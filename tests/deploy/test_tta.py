"""Test-time augmentation views: how many, the identity first, a quarter turn as torch.rot90, and the modes and
shapes that are refused."""

from __future__ import annotations

import pytest
import torch

from leuko.deploy.tta import DEFAULT_TTA, TTA_MODES, TTAError, apply_view, check_tta, views


def test_each_mode_has_its_views_with_the_identity_first():
    assert [len(views(m)) for m in TTA_MODES] == [1, 8, 16]
    assert all(views(m)[0] == ((), False) for m in TTA_MODES)
    assert DEFAULT_TTA in TTA_MODES


@pytest.mark.parametrize("tta", ["flip", "flip_rot90"])
def test_the_views_are_distinct_and_closed_under_the_flips(tta):
    """Flipping the input only reorders the views: why a mean over them is invariant to flips."""
    x = torch.randn(1, 1, 3, 4, 4)

    def seen(volume):
        return sorted(tuple(apply_view(volume, f, t).flatten().tolist()) for f, t in views(tta))

    assert len(set(seen(x))) == len(views(tta))
    for axes in ((2,), (3,), (4,), (2, 3, 4)):
        assert seen(x.flip(axes)) == seen(x)
    if tta == "flip_rot90":
        assert seen(torch.rot90(x, 1, dims=(3, 4))) == seen(x)
    else:
        assert seen(torch.rot90(x, 1, dims=(3, 4))) != seen(x)


def test_a_quarter_turn_is_torch_rot90_in_h_w():
    x = torch.randn(2, 1, 3, 5, 5)
    assert torch.equal(apply_view(x, (), True), torch.rot90(x, 1, dims=(3, 4)))
    assert torch.equal(apply_view(x, (2, 4), True), torch.rot90(x, 1, dims=(3, 4)).flip((2, 4)))
    assert apply_view(x, (), False) is x


def test_unknown_modes_and_non_square_turns_are_refused():
    with pytest.raises(TTAError, match="--tta 'rot': choose one of none, flip, flip_rot90"):
        check_tta("rot")
    with pytest.raises(TTAError, match=r"needs H == W, but the model's volumes are 16 x 16 x 12"):
        check_tta("flip_rot90", (16, 16, 12))
    assert check_tta("flip", (16, 16, 12)) == "flip"
    assert check_tta("flip_rot90", (8, 16, 16)) == "flip_rot90"
