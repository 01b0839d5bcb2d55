"""TTA views chosen on validation (infer.tta.views: auto): choose_views, resolve_views, run_inference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from pipeline import config
from pipeline.config import InferConfig
from pipeline.errors import UserError
from pipeline.inference import predict, resolve_views, run_inference, with_views
from pipeline.ood import make_detector
from pipeline.tta import choose_views, combine_class_scores

CPU = torch.device("cpu")
CANDIDATES = [["identity"], ["identity", "hflip"], ["identity", "vflip"], ["identity", "hflip", "vflip", "rot180"]]


class FlipNuisanceModel(nn.Module):
    """Two classes. Embedding (c, a): c = mean brightness - 0.5 (the class signal, the same in every
    view), a = mean(left half) - mean(right half) (a nuisance that changes sign under hflip and rot180,
    not under vflip). Logits (c + a, -(c + a)): right only on average over a left-right mirror."""

    def __init__(self) -> None:
        super().__init__()
        self.classifier = nn.Linear(2, 2)
        with torch.no_grad():
            self.classifier.weight.copy_(torch.tensor([[1.0, 1.0], [-1.0, -1.0]]))
            self.classifier.bias.zero_()

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        c = x.mean(dim=(1, 2, 3)) - 0.5
        a = x[..., :half].mean(dim=(1, 2, 3)) - x[..., half:].mean(dim=(1, 2, 3))
        return torch.stack([c, a], dim=1)

    def head(self, emb: torch.Tensor) -> torch.Tensor:
        return self.classifier(emb)


def _split(n: int, nuisance: float, seed: int) -> tuple[list[dict], np.ndarray]:
    """Chips of two balanced classes (brightness 0.5 ± 0.05) with a random left-right imbalance ± `nuisance`."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    x = np.full((n, 1, 8, 8), 0.5, np.float32) + np.where(labels == 0, 0.05, -0.05)[:, None, None, None]
    sign = rng.choice([-1.0, 1.0], n).astype(np.float32)
    x[..., :4] += (sign * nuisance / 2)[:, None, None, None]
    x[..., 4:] -= (sign * nuisance / 2)[:, None, None, None]
    x += rng.normal(0, 0.01, x.shape).astype(np.float32)
    x = x.astype(np.float32)
    return [{"image": torch.from_numpy(x[i]), "index": torch.tensor(i)} for i in range(n)], labels


def _cfg(**tta) -> InferConfig:
    return InferConfig.model_validate({"batch_size": 16, "tta": {"views": "auto", "candidates": CANDIDATES, **tta}})


def test_choose_views_takes_the_fewest_views_that_help_and_keeps_identity_otherwise() -> None:
    rng = np.random.default_rng(0)
    labels = np.arange(200) % 4
    truth = np.eye(4)[labels]
    nuisance = rng.normal(0, 1, (200, 4)) * 2
    helps = {"identity": truth + nuisance, "hflip": truth - nuisance, "vflip": truth + nuisance, "rot180": truth - nuisance}
    choice = choose_views(helps, labels, CANDIDATES, "logits", min_gain_se=0.0)
    assert choice.views == ["identity", "hflip"]  # the 4-view set ties at 1.0 with more views
    rows = {r["views"]: r for r in choice.table}
    assert rows["identity+hflip"]["balanced_accuracy"] == 1.0 and rows["identity+hflip+vflip+rot180"]["balanced_accuracy"] == 1.0
    assert rows["identity"]["balanced_accuracy"] < 0.8 and rows["identity+hflip"]["gain"] > 0.2
    assert 0 < rows["identity"]["se"] < 0.1 and [r["chosen"] for r in choice.table].count(True) == 1
    assert choice.auto and "beats identity" in choice.reason

    noise = {v: truth + rng.normal(0, 1, (200, 4)) * 2 for v in ("identity", "hflip", "vflip", "rot180")}
    noise["identity"] = truth + 0.1 * rng.normal(0, 1, (200, 4))  # identity alone is right; the others only add noise
    kept = choose_views(noise, labels, CANDIDATES[1:], "probs", min_gain_se=1.0)  # identity is compared even when not listed
    assert kept.views == ["identity"] and kept.table[0]["views"] == "identity" and kept.table[0]["chosen"]
    assert "no candidate set beats" in kept.reason

    # a small gain (4 more chips right out of 200, paired s.e. about 0.01) passes at 0 s.e., not at 3
    small = {v: truth + nuisance for v in ("identity", "vflip", "rot180")}
    small["hflip"] = truth + nuisance
    fixed = np.flatnonzero(np.argmax(truth + nuisance, axis=1) != labels)[:4]
    small["hflip"][fixed] = truth[fixed] * 100  # identity+hflip is right on these 4 chips as well
    assert choose_views(small, labels, CANDIDATES, "logits", min_gain_se=0.0).views == ["identity", "hflip"]
    strict = choose_views(small, labels, CANDIDATES, "logits", min_gain_se=3.0)
    assert strict.views == ["identity"] and "3 paired standard errors" in strict.reason
    row = next(r for r in strict.table if r["views"] == "identity+hflip")
    assert row["gain"] == pytest.approx(0.02, abs=0.01) and 0 < row["gain_se"] < row["gain"] < 3 * row["gain_se"]


def test_choose_views_keeps_the_baseline_unless_a_candidate_beats_it() -> None:
    rng = np.random.default_rng(1)
    labels = np.arange(200) % 4
    truth = np.eye(4)[labels]
    shifts = ["identity", "shift_up", "shift_down", "shift_left", "shift_right"]
    # each view alone is noisy, their average much less so: the 5-view baseline beats identity alone clearly
    scores = {v: truth + rng.normal(0, 1, (200, 4)) * 1.2 for v in [*shifts, "hflip", "vflip", "rot180"]}
    base = choose_views(scores, labels, CANDIDATES, "logits", min_gain_se=1.0, baseline=shifts)
    rows = {r["views"]: r for r in base.table}
    assert base.views == shifts and base.table[0]["views"] == "+".join(shifts) and base.table[0]["chosen"]
    assert rows["identity"]["gain"] < -0.1  # identity is compared, against the baseline
    assert "the baseline identity+shift_up" in base.reason
    # a candidate right on 2 more chips than the baseline (gain about 1.4 paired s.e.) replaces it at 0 s.e., not at 2
    better = dict(scores)
    baseline_scores = combine_class_scores([scores[v] for v in shifts], "logits")
    wrong = np.flatnonzero(baseline_scores.argmax(axis=1) != labels)
    better["hflip"] = baseline_scores.copy()
    better["hflip"][wrong[:2]] = truth[wrong[:2]] * 100
    assert choose_views(better, labels, [["hflip"]], "logits", min_gain_se=2.0, baseline=shifts).views == shifts
    assert choose_views(better, labels, [["hflip"]], "logits", min_gain_se=0.0, baseline=shifts).views == ["hflip"]
    tied = {**better, "hflip": baseline_scores}  # a true tie with one view against five: the baseline stays
    assert choose_views(tied, labels, [["hflip"]], "logits", min_gain_se=0.0, baseline=shifts).views == shifts
    # identity alone by default (chosen on the quick replica's validation), in every profile
    assert config.load_config("quick").infer.tta.baseline == ["identity"] == config.load_config("full").infer.tta.baseline
    with pytest.raises(UserError, match=r"infer\.tta\.baseline"):
        config.load_config("quick", ["infer.tta.baseline=[identity, spin]"])


def test_paired_balanced_accuracy_gain_by_hand() -> None:
    from pipeline.metrics import paired_balanced_accuracy_gain

    labels = np.array([0, 0, 0, 0, 1, 1])
    a = np.array([0, 1, 1, 0, 1, 0])  # recalls 0.5, 0.5
    b = np.array([0, 0, 1, 0, 1, 1])  # recalls 0.75, 1.0: per-chip differences (0, 1, 0, 0) and (0, 1)
    gain, se = paired_balanced_accuracy_gain(labels, a, b)
    assert gain == pytest.approx((0.25 + 0.5) / 2)
    assert se == pytest.approx(np.sqrt(0.1875 / 4 + 0.25 / 2) / 2)


def test_candidates_are_checked_at_load_and_auto_is_the_default() -> None:
    with pytest.raises(UserError, match=r"infer\.tta\.candidates.*spin"):
        config.load_config("tiny", ["infer.tta.candidates=[[identity], [identity, spin]]"])
    with pytest.raises(UserError, match=r"infer\.tta\.candidates"):
        config.load_config("tiny", ["infer.tta.candidates=[]"])
    assert config.load_config("quick").infer.tta.views == "auto"
    assert config.load_config("tiny").infer.tta.views == ["identity", "hflip"]  # the tiny profile keeps explicit views
    with pytest.raises(ValueError, match="auto"):
        predict(FlipNuisanceModel(), _split(4, 0.3, 0)[0], _cfg(), CPU)  # never a forward with unresolved views


@pytest.mark.parametrize("average", ["logits", "probs"])
def test_resolve_views_reuses_per_view_outputs_exactly(average: str) -> None:
    model, (val, labels) = FlipNuisanceModel(), _split(40, 0.3, 1)
    cfg = _cfg(average=average, scales=[1.0, 0.75])
    resolved = resolve_views(model, cfg, CPU, lambda: (val, labels))
    assert resolved.choice.views == ["identity", "hflip"] and resolved.cfg.tta.views == ["identity", "hflip"]
    direct = predict(model, val, with_views(cfg, ["identity", "hflip"]), CPU)
    for reused, fresh in zip(resolved.validation, direct):
        np.testing.assert_allclose(reused, fresh, rtol=1e-5, atol=1e-6)
    fallback = resolve_views(model, cfg, CPU, None)
    assert fallback.choice.views == ["identity"] and "no validation split" in fallback.choice.reason
    shifted = resolve_views(model, _cfg(baseline=config.SHIFT_VIEW_SET), CPU, None)
    assert shifted.choice.views == config.SHIFT_VIEW_SET and "the baseline identity+shift_up" in shifted.choice.reason
    # the config key reaches the choice: the shift set is compared first and identity+hflip beats it
    chosen = resolve_views(model, _cfg(baseline=config.SHIFT_VIEW_SET), CPU, lambda: (val, labels))
    assert chosen.choice.table[0]["views"] == "+".join(config.SHIFT_VIEW_SET) and chosen.choice.views == ["identity", "hflip"]
    assert "beats the baseline identity+shift_up" in chosen.choice.reason
    given = resolve_views(model, with_views(cfg, ["vflip"]), CPU, lambda: pytest.fail("given views read no validation"))
    assert given.choice.views == ["vflip"] and not given.choice.auto


def test_run_inference_uses_the_chosen_views_for_test_and_ood_fit() -> None:
    model = FlipNuisanceModel()
    (test, test_labels), (train, train_labels), (val, val_labels) = (_split(n, 0.3, s) for n, s in ((24, 2), (40, 3), (40, 4)))
    cfg = _cfg()
    out = run_inference(model, test, cfg, make_detector("knn", cfg.ood), CPU,
                        fit_data=lambda: (train, train_labels), val_data=lambda: (val, val_labels))
    assert out.tta.views == ["identity", "hflip"] and out.views == 2
    assert (out.probs.argmax(axis=1) == test_labels).all()  # identity alone gets about half of them wrong
    chosen = with_views(cfg, ["identity", "hflip"])
    by_hand = make_detector("knn", cfg.ood)
    _, train_logits, train_emb = predict(model, train, chosen, CPU)
    by_hand.fit(train_logits, train_emb, train_labels)
    _, test_logits, test_emb = predict(model, test, chosen, CPU)
    np.testing.assert_allclose(out.score, by_hand.score(logits=test_logits, embeddings=test_emb), rtol=1e-5, atol=1e-6)
    record = out.tta.record()
    assert record["auto"] and record["views"] == ["identity", "hflip"] and len(record["validation"]) == 4
