"""The Python API (:mod:`backdoorlab.api`): the README example, run as written, on a tiny victim."""

import json

import numpy as np
import pytest
import torch

from test_inspect_cleanse import QuadrantNet, quadrant_data  # a hand-built victim whose answer is known: (0, 2)

README_EXAMPLE = """
from backdoorlab.api import audit, cleanse, load_data, load_model

clean = load_data("clean.npz")                   # the defender's clean images
model = load_model("model.pt", data=clean)       # TorchScript, or backdoorlab safetensors
report = audit(model, clean)                     # pairwise trigger scan (seed 000)
print(report.backdoored, report.flagged_pairs)   # True [(0, 2)]
report.write("audit-report")                     # figures/, audit.json

found = cleanse("train.npz", model, inspection=report)
print(found.flagged_indices)                     # the poisoned training samples
relabelled = found.cleaned()                     # the training set, labels corrected
"""


@pytest.fixture
def victim_files(tmp_path, monkeypatch):
    """model.pt (class-0 images with a bright pixel at (9, 9) go to class 2), clean.npz, and
    train.npz with 15 poisoned samples (is_poison: ground truth, for reporting only)."""
    torch.jit.trace(QuadrantNet(backdoor=True), torch.rand(2, 1, 10, 10)).save(str(tmp_path / "model.pt"))
    clean = quadrant_data(30, 0)
    np.savez(tmp_path / "clean.npz", x=clean.x[:, 0].numpy(), y=clean.y.numpy())
    train = quadrant_data(100, 1)
    x, y = train.x.clone(), train.y.clone()
    planted = torch.nonzero(y == 0).flatten()[:15]
    x[planted, 0, 9, 9] = 255
    y[planted] = 2
    is_poison = torch.zeros(len(y), dtype=torch.bool)
    is_poison[planted] = True
    np.savez(tmp_path / "train.npz", x=x[:, 0].numpy(), y=y.numpy(), is_poison=is_poison.numpy())
    monkeypatch.chdir(tmp_path)
    return tmp_path, planted


def test_readme_example(victim_files, capsys):
    tmp, planted = victim_files
    assert len([line for line in README_EXAMPLE.strip().splitlines() if line.strip()]) < 15
    scope: dict = {}
    exec(compile(README_EXAMPLE, "README.md", "exec"), scope)
    report, found = scope["report"], scope["found"]
    assert report.backdoored is True and report.flagged_pairs[0] == (0, 2) and report.flagged_targets == [2]
    assert capsys.readouterr().out.splitlines()[0].startswith("True [(0, 2)")
    assert sorted(found.flagged_indices) == sorted(planted.tolist())
    assert torch.equal(scope["relabelled"].y[planted], torch.zeros(15, dtype=torch.long))
    d = json.loads((tmp / "audit-report" / "audit.json").read_text())
    for key in ("backdoored", "flagged_pairs", "flagged_targets", "anomaly_index", "statistic", "top_pairs", "seconds"):
        assert key in d, key
    assert (tmp / "audit-report" / "figures" / "patterns.png").read_bytes()[:4] == b"\x89PNG"
    # the whole scan: every pair's norm (None on the diagonal) and whether it reached pi
    k = len(d["pair_norms"])
    assert k == len(d["pair_reached"]) and all(d["pair_norms"][c][c] is None for c in range(k))
    top = d["top_pairs"][0]
    assert abs(d["pair_norms"][top["source"]][top["target"]] - top["norm"]) < 1e-4 and d["pair_reached"][0][2]
    # the ground truth in train.npz only reports; the cleanser never saw it
    assert found.to_dict()["tpr"] == 1.0 and found.to_dict()["fpr"] == 0.0


def test_paths_in_bool_out_and_one_folder(victim_files):
    from backdoorlab.api import audit

    tmp, planted = victim_files
    res = audit("model.pt", "clean.npz", train="train.npz", images_per_class=30)
    assert isinstance(res.backdoored, bool) and res.backdoored
    d = res.to_dict()
    assert sorted(d["flagged_indices"]) == sorted(planted.tolist()) and set(d["corrected_labels"]) == {0}
    json.dumps(d, allow_nan=False)  # JSON-ready: no tensors, no NaN
    folder = res.write()
    assert folder.name.startswith("audit-") and (folder / "flagged.csv").is_file() and (folder / "cleanse.npz").is_file()
    assert res.to_dict()["report_dir"] == str(folder)


def test_imports_and_clear_errors(tmp_path):
    from backdoorlab.api import (audit, bench, bias_maps, cleanse, guard, load_data, load_model, repair, run,
                                 train_robust)
    from backdoorlab.errors import BackdoorLabError

    assert all(callable(f) for f in (bench, bias_maps, cleanse, guard, load_data, run, train_robust))

    torch.jit.trace(QuadrantNet(backdoor=False), torch.rand(2, 1, 10, 10)).save(str(tmp_path / "m.pt"))
    with pytest.raises(BackdoorLabError, match="data="):
        load_model(tmp_path / "m.pt")  # TorchScript: the images it takes are unknown without data
    with pytest.raises(BackdoorLabError, match="not a repairer; repairers: "):
        repair(QuadrantNet(True), quadrant_data(5, 0), method="strip")
    with pytest.raises(BackdoorLabError, match="not found"):
        audit(tmp_path / "m.pt", tmp_path / "nope.npz")
