"""Test-time augmentation: views against numpy, invariance on a symmetric model, one batched forward."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.errors import UserError
from pipeline.tta import DIHEDRAL_VIEWS, SHIFT_VIEWS, VIEW_NAMES, apply_view, predict_tta, rescale, shift


class PoolModel(nn.Module):
    """embed = global average and max pooling of the input (invariant to flips/rotations); head = linear."""

    def __init__(self, num_classes: int = 4) -> None:
        super().__init__()
        self.linear = nn.Linear(2, num_classes)
        self.embed_calls = 0
        self.head_calls = 0
        self.batch_sizes: list[int] = []

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        self.embed_calls += 1
        self.batch_sizes.append(x.shape[0])
        return torch.stack([x.mean(dim=(1, 2, 3)), x.amax(dim=(1, 2, 3))], dim=1)

    def head(self, emb: torch.Tensor) -> torch.Tensor:
        self.head_calls += 1
        return self.linear(emb)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))


class CornerModel(nn.Module):
    """Not symmetric: embed = the top-left pixel and the column-0 mean, so each view sees something else."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(2, 3)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([x[:, 0, 0, 0], x[:, 0, :, 0].mean(dim=1)], dim=1)


NUMPY_VIEWS = {
    "identity": lambda a: a,
    "hflip": lambda a: a[..., :, ::-1],
    "vflip": lambda a: a[..., ::-1, :],
    "rot90": lambda a: np.rot90(a, 1, axes=(-2, -1)),
    "rot180": lambda a: np.rot90(a, 2, axes=(-2, -1)),
    "rot270": lambda a: np.rot90(a, 3, axes=(-2, -1)),
    "transpose": lambda a: np.swapaxes(a, -2, -1),
    "transverse": lambda a: np.swapaxes(a[..., ::-1, ::-1], -2, -1),
}


def _images(batch: int = 3, size: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 1, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("view", DIHEDRAL_VIEWS)
def test_apply_view_matches_numpy(view: str) -> None:
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).reshape(2, 1, 4, 4)
    expected = np.ascontiguousarray(NUMPY_VIEWS[view](x.numpy()))
    np.testing.assert_array_equal(apply_view(x, view).numpy(), expected)


def test_views_are_the_eight_distinct_symmetries_of_the_square() -> None:
    x = torch.arange(16, dtype=torch.float32).reshape(1, 1, 4, 4)
    outputs = {tuple(apply_view(x, v).flatten().tolist()) for v in DIHEDRAL_VIEWS}
    assert len(outputs) == len(DIHEDRAL_VIEWS) == 8


def test_shift_moves_content_and_reflects_the_uncovered_border() -> None:
    x = torch.arange(25, dtype=torch.float32).reshape(1, 1, 5, 5)
    down = shift(x, 1, 0)[0, 0]
    torch.testing.assert_close(down[1:], x[0, 0, :4])  # content moved down one row
    torch.testing.assert_close(down[0], x[0, 0, 1])  # the new top row mirrors row 1 (reflect, no wrap-around)
    left = shift(x, 0, -2)[0, 0]
    torch.testing.assert_close(left[:, :3], x[0, 0, :, 2:])
    torch.testing.assert_close(left[:, 3:], x[0, 0, :, [3, 2]])
    with pytest.raises(ValueError, match="does not fit"):
        shift(x, 5, 0)


def test_shift_views_move_a_packed_chip_by_three_percent_of_its_side() -> None:
    x = torch.rand(2, 1, 100, 100, generator=torch.Generator().manual_seed(0))
    expected = {"shift_up": (-3, 0), "shift_down": (3, 0), "shift_left": (0, -3), "shift_right": (0, 3)}
    assert set(SHIFT_VIEWS) == set(expected)
    for view, (dy, dx) in expected.items():
        moved = apply_view(x, view)
        assert moved.shape == x.shape
        # the centre 88-px window of the moved chip is the window displaced by (-dy, -dx): a window trained on
        torch.testing.assert_close(moved[..., 6:94, 6:94], x[..., 6 - dy : 94 - dy, 6 - dx : 94 - dx])
    tiny = torch.rand(1, 1, 10, 10)
    assert not torch.equal(apply_view(tiny, "shift_up"), tiny)  # at least one pixel on small chips


def test_unknown_view_lists_the_valid_ones() -> None:
    with pytest.raises(UserError, match="valid views are identity, hflip"):
        apply_view(_images(), "rot45")
    with pytest.raises(UserError, match="rot45"):
        predict_tta(PoolModel(), _images(), ["identity", "rot45"], [1.0])


def test_symmetric_model_gives_identical_logits_for_every_view() -> None:
    model = PoolModel()
    x = _images()
    per_view = [predict_tta(model, x, [v], [1.0])[0] for v in DIHEDRAL_VIEWS]
    for logits in per_view[1:]:
        torch.testing.assert_close(logits, per_view[0], rtol=0, atol=1e-6)
    averaged = predict_tta(model, x, list(DIHEDRAL_VIEWS), [1.0]).class_scores
    torch.testing.assert_close(averaged, per_view[0], rtol=0, atol=1e-6)


def test_all_views_and_scales_go_through_one_forward() -> None:
    model = PoolModel()
    views, scales = ["identity", "hflip", "rot90", "transpose"], [0.75, 1.0, 1.25]
    scores, emb, logits = predict_tta(model, _images(batch=5), views, scales)
    assert (model.embed_calls, model.head_calls) == (1, 1)
    assert model.batch_sizes == [5 * len(views) * len(scales)]
    assert scores.shape == logits.shape == (5, 4) and emb.shape == (5, 2)


def test_chunked_forward_equals_single_forward() -> None:
    model, x, views = PoolModel(), _images(batch=5), list(DIHEDRAL_VIEWS)
    whole = predict_tta(model, x, views, [1.0, 0.8])
    chunked = PoolModel()
    chunked.load_state_dict(model.state_dict())
    parts = predict_tta(chunked, x, views, [1.0, 0.8], max_batch=7)
    assert max(chunked.batch_sizes) <= 7 and chunked.embed_calls == -(-5 * 16 // 7)
    for a, b in zip(whole, parts):
        torch.testing.assert_close(a, b)


def test_average_of_logits_and_of_probabilities() -> None:
    torch.manual_seed(0)
    model, x = CornerModel(), _images(batch=4)
    views = ["identity", "hflip", "vflip", "rot180"]
    per_view_logits = torch.stack([model.head(model.embed(apply_view(x, v))) for v in views])
    per_view_emb = torch.stack([model.embed(apply_view(x, v)) for v in views])
    scores, emb, logits = predict_tta(model, x, views, [1.0], average="logits")
    torch.testing.assert_close(scores, per_view_logits.mean(0))
    torch.testing.assert_close(logits, per_view_logits.mean(0))
    torch.testing.assert_close(emb, per_view_emb.mean(0))
    log_probs, emb_p, logits_p = predict_tta(model, x, views, [1.0], average="probs")
    torch.testing.assert_close(log_probs.exp(), per_view_logits.softmax(-1).mean(0))
    torch.testing.assert_close(logits_p, per_view_logits.mean(0))
    torch.testing.assert_close(emb_p, per_view_emb.mean(0))
    with pytest.raises(UserError, match="average"):
        predict_tta(model, x, views, [1.0], average="median")


class NoisyModel(nn.Module):
    """Mode matters: dropout and batch-norm in `embed`, so train mode gives random, batch-dependent outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3, padding=1)
        self.norm = nn.BatchNorm2d(6)
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(6, 3)
        with torch.no_grad():  # running statistics far from a batch's own, so eval and train differ
            self.norm.running_mean.fill_(2.0)
            self.norm.running_var.fill_(9.0)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.norm(self.conv(x)).mean(dim=(2, 3)))


def test_probability_averaging_keeps_raw_logits_for_ood() -> None:
    """average=probs decides the class from averaged probabilities, but OOD scores still see the mean
    raw logits: energy differs between chips and equals the energy of logit averaging (issue 9, item 3)."""
    from pipeline.ood import ood_score

    torch.manual_seed(0)
    model, x = CornerModel(), _images(batch=6) * 4.0
    views = ["identity", "hflip", "vflip", "rot180"]
    by_probs = predict_tta(model, x, views, [1.0], average="probs")
    by_logits = predict_tta(model, x, views, [1.0], average="logits")
    torch.testing.assert_close(by_probs.logits, by_logits.logits)
    energy = ood_score(by_probs.logits, "energy")
    assert np.ptp(energy) > 1e-3  # not the constant logsumexp(log p) = 0
    np.testing.assert_allclose(energy, ood_score(by_logits.logits, "energy"), rtol=1e-6)
    np.testing.assert_allclose(
        ood_score(by_probs.logits, "maxlogit"), ood_score(by_logits.class_scores, "maxlogit"), rtol=1e-6
    )
    per_view = torch.stack([model.head(model.embed(apply_view(x, v))) for v in views])
    torch.testing.assert_close(by_probs.class_scores.softmax(-1), per_view.softmax(-1).mean(0))


def test_predict_tta_runs_in_eval_mode_and_restores_training_mode() -> None:
    torch.manual_seed(0)
    model, x, views = NoisyModel(), _images(batch=4), ["identity", "hflip"]
    running = {k: v.clone() for k, v in model.norm.state_dict().items()}
    model.eval()
    with torch.no_grad():
        expected = torch.stack([model.head(model.embed(apply_view(x, v))) for v in views]).mean(0)
    model.train()
    first = predict_tta(model, x, views, [1.0])
    second = predict_tta(model, x[:1], views, [1.0])  # another batch: eval mode ignores batch statistics
    assert model.training and model.drop.training and model.norm.training  # mode restored
    torch.testing.assert_close(first.class_scores, expected)
    torch.testing.assert_close(second.class_scores, expected[:1])
    for key, value in model.norm.state_dict().items():  # batch-norm statistics untouched
        torch.testing.assert_close(value, running[key], msg=key)
    model.eval()
    predict_tta(model, x, views, [1.0])
    assert not model.training and not model.drop.training  # eval stays eval

    class Boom(Exception):
        pass

    class Explode(nn.Module):
        def forward(self, emb: torch.Tensor) -> torch.Tensor:
            raise Boom

    broken = NoisyModel().train()
    broken.head = Explode()
    with pytest.raises(Boom):
        predict_tta(broken, x, views, [1.0])
    assert broken.training and broken.drop.training  # restored even when the forward fails


@pytest.mark.parametrize("scale", [0.5, 0.8, 1.0, 1.3, 2.0, 0.2])
def test_rescale_keeps_the_size(scale: float) -> None:
    x = _images(batch=2, size=10)
    y = rescale(x, scale)
    assert y.shape == x.shape and torch.isfinite(y).all()


def _centre_of_mass(img: torch.Tensor) -> tuple[float, float]:
    rows, cols = torch.meshgrid(torch.arange(img.shape[-2]), torch.arange(img.shape[-1]), indexing="ij")
    mass = img.sum()
    return float((img * rows).sum() / mass), float((img * cols).sum() / mass)


def test_rescale_zooms_about_the_centre() -> None:
    x = torch.zeros(1, 1, 20, 20)
    x[..., 8:12, 8:12] = 1.0  # a centred 4x4 square
    up, down = rescale(x, 2.0)[0, 0], rescale(x, 0.5)[0, 0]
    assert up.sum() == pytest.approx(64, rel=0.05) and bool((up[7:13, 7:13] == 1).all())
    inner = down[5:15, 5:15]  # the 10x10 shrunken image; the rest is its reflection
    assert inner.sum() == pytest.approx(4, rel=0.05)
    assert torch.equal(down[:5], down[6:11].flip(0)) and torch.equal(down[:, :5], down[:, 6:11].flip(1))
    assert _centre_of_mass(up) == pytest.approx((9.5, 9.5))
    assert _centre_of_mass(inner) == pytest.approx((4.5, 4.5))
    assert rescale(x, 1.0) is x


def test_bad_scales_and_non_square_rotations_are_user_errors() -> None:
    model = PoolModel()
    with pytest.raises(UserError, match="scale"):
        predict_tta(model, _images(), ["identity"], [0.0])
    with pytest.raises(UserError, match="scales is empty"):
        predict_tta(model, _images(), ["identity"], [])
    with pytest.raises(UserError, match="views is empty"):
        predict_tta(model, _images(), [], [1.0])
    wide = torch.rand(2, 1, 6, 9)
    with pytest.raises(UserError, match="need square images"):
        predict_tta(model, wide, ["identity", "rot90"], [1.0])
    logits = predict_tta(model, wide, ["identity", "hflip", "vflip", "rot180"], [1.0, 1.2]).logits
    assert logits.shape == (2, 4)


def test_infer_predict_scores_ood_from_raw_logits_under_probability_averaging() -> None:
    """pipeline.inference.predict: labels from the averaged probabilities, OOD logits from the raw mean logits."""
    from pipeline.ood import ood_score
    from pipeline.config import InferConfig
    from pipeline.inference import predict, softmax

    torch.manual_seed(0)
    model, x = CornerModel(), _images(batch=5) * 4.0
    dataset = [{"image": x[i], "index": torch.tensor(i)} for i in range(len(x))]
    views = ["identity", "hflip", "vflip", "rot180"]
    runs = {
        average: predict(model, dataset, InferConfig.model_validate({"batch_size": 2, "tta": {"views": views, "scales": [1.0], "average": average}}),
                         torch.device("cpu"))
        for average in ("probs", "logits")
    }
    (scores_p, logits_p, emb_p), (scores_l, logits_l, emb_l) = runs["probs"], runs["logits"]
    per_view = torch.stack([model.head(model.embed(apply_view(x, v))) for v in views]).detach()
    np.testing.assert_allclose(softmax(scores_p), per_view.softmax(-1).mean(0).numpy(), rtol=1e-5)
    np.testing.assert_allclose(scores_l, per_view.mean(0).numpy(), rtol=1e-5)
    np.testing.assert_allclose(logits_p, logits_l, rtol=1e-6)
    np.testing.assert_allclose(emb_p, emb_l, rtol=1e-6)
    energy = ood_score(logits_p, "energy")
    assert np.ptp(energy) > 1e-3
    np.testing.assert_allclose(energy, ood_score(logits_l, "energy"), rtol=1e-6)


def test_the_config_schema_knows_every_view() -> None:
    from pipeline.config import VIEWS

    assert tuple(VIEWS) == VIEW_NAMES == DIHEDRAL_VIEWS + SHIFT_VIEWS
