import math

import pytest
import torch

from backdoorlab import metrics as M


def test_accuracy_asr_ra_by_hand():
    pred = torch.tensor([0, 1, 1, 2, 2])
    y = torch.tensor([0, 1, 2, 2, 0])
    assert M.clean_accuracy(pred, y) == pytest.approx(3 / 5)
    assert M.attack_success_rate(torch.tensor([1, 1, 1, 0]), torch.tensor([1, 1, 1, 1])) == pytest.approx(0.75)
    assert M.robust_accuracy(torch.tensor([1, 1, 1, 0]), torch.tensor([0, 2, 3, 0])) == pytest.approx(0.25)
    assert math.isnan(M.accuracy(torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long)))


def test_der_sign_and_range():
    # ASR removed at no CA cost: perfect
    assert M.defense_effectiveness_rating(0.99, 0.99, 1.0, 0.0) == pytest.approx(1.0)
    # nothing changed
    assert M.defense_effectiveness_rating(0.99, 0.99, 1.0, 1.0) == pytest.approx(0.5)
    # CA lost 10 points, ASR dropped 50 points: (0.5 - 0.1 + 1) / 2
    assert M.defense_effectiveness_rating(0.95, 0.85, 0.9, 0.4) == pytest.approx(0.7)
    # CA rose, ASR rose: gains are not rewarded, no penalty either
    assert M.defense_effectiveness_rating(0.9, 0.95, 0.5, 0.6) == pytest.approx(0.5)


def test_detector_rates_by_hand():
    flagged = torch.tensor([1, 1, 0, 0, 1, 0], dtype=torch.bool)
    truth = torch.tensor([1, 0, 1, 0, 1, 0], dtype=torch.bool)
    assert M.confusion(flagged, truth) == (2, 1, 2, 1)
    assert M.tpr(flagged, truth) == pytest.approx(2 / 3)
    assert M.fpr(flagged, truth) == pytest.approx(1 / 3)
    assert M.precision(flagged, truth) == pytest.approx(2 / 3)
    assert M.frr(torch.tensor([True, False, False, False])) == pytest.approx(0.25)
    assert M.far(torch.tensor([True, True, False])) == pytest.approx(1 / 3)


def test_auroc_matches_hand_count_with_ties():
    scores = torch.tensor([0.1, 0.4, 0.35, 0.8, 0.4])
    truth = torch.tensor([0, 0, 1, 1, 1], dtype=torch.bool)
    # pairs (pos, neg): 0.35>0.1 yes, 0.35>0.4 no; 0.8 beats both; 0.4>0.1 yes, 0.4=0.4 half -> 4.5 / 6
    assert M.auroc(scores, truth) == pytest.approx(4.5 / 6)
    assert M.auroc(torch.tensor([1.0, 2.0]), torch.tensor([False, True])) == 1.0
    assert math.isnan(M.auroc(torch.tensor([1.0, 2.0]), torch.tensor([True, True])))


def test_auroc_agrees_with_sklearn():
    from sklearn.metrics import roc_auc_score

    g = torch.Generator().manual_seed(0)
    s = torch.randint(0, 20, (500,), generator=g).double()
    t = torch.rand(500, generator=g) < 0.3
    assert M.auroc(s, t) == pytest.approx(roc_auc_score(t.numpy(), s.numpy()))
    fpr, tpr, thr = M.roc_curve(s, t)
    assert fpr[0] == 0 and tpr[-1] == pytest.approx(1.0) and fpr[-1] == pytest.approx(1.0)
    assert torch.all(fpr[1:] >= fpr[:-1]) and torch.all(tpr[1:] >= tpr[:-1])
    # trapezoid area of the curve is the AUROC
    assert torch.trapz(tpr, fpr).item() == pytest.approx(M.auroc(s, t))
