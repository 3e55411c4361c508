"""Training throughput: our in-memory loop vs the peers' per-image Dataset/DataLoader pipeline.

(a) ours: ``backdoorlab.train.train`` over the uint8 tensors (poisoning done once up front,
    whole-batch augmentation, channels_last);
(b) the pipeline BackdoorBox / BackdoorBench build: a ``Dataset`` whose ``__getitem__`` turns one
    uint8 image into a PIL image, stamps the trigger when the index is poisoned, applies the
    torchvision transforms (RandomCrop + flip on CIFAR) and ``ToTensor``, behind a
    ``torch.utils.data.DataLoader`` (num_workers=0: on 2 cores, worker processes compete with
    the training threads).
Same model init, data, poisoned indices, optimiser and epochs; run in one process, alternating
(a, b, b, a). Prints both throughputs, the ratio, CA/ASR of both, and our images/s against the
ceiling: the same model's forward+backward+step on one pre-built batch, repeated.

    python benchmarks/bench_train.py [--epochs 2] [--only mnist|cifar10]
"""

from __future__ import annotations

import argparse
import copy
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from _common import header, need_shared

from backdoorlab.attacks import ATTACKS, poison, poison_test
from backdoorlab.data import load_source, make_splits
from backdoorlab.metrics import accuracy
from backdoorlab.models import ModelSpec, build_model
from backdoorlab.train import TrainConfig, lr_at, make_optimizer, predict, train


class PeerPoisonedDataset(torch.utils.data.Dataset):
    """The peers' shape: per-image PIL conversion, trigger stamp and transforms in __getitem__."""

    def __init__(self, x_hwc: np.ndarray, y: np.ndarray, poison_idx: set[int], target: int, patch: int, transform):
        self.x, self.y, self.poison_idx, self.target, self.patch, self.transform = x_hwc, y, poison_idx, target, patch, transform

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        img = Image.fromarray(self.x[i].squeeze(-1) if self.x.shape[-1] == 1 else self.x[i])
        label = int(self.y[i])
        if i in self.poison_idx:
            arr = np.array(img)
            arr[-self.patch:, -self.patch:] = 255
            img = Image.fromarray(arr)
            label = self.target
        return self.transform(img), label


def peer_train(model, ds, cfg: TrainConfig, seed: int) -> float:
    torch.manual_seed(seed)
    loader = torch.utils.data.DataLoader(ds, batch_size=cfg.batch_size, shuffle=True, num_workers=0,
                                         generator=torch.Generator().manual_seed(seed))
    opt = make_optimizer(model, cfg)
    total = len(loader) * cfg.epochs
    step, seen = 0, 0
    t0 = time.perf_counter()
    model.train()
    for _ in range(cfg.epochs):
        for xb, yb in loader:
            for gr in opt.param_groups:
                gr["lr"] = lr_at(cfg, step, total, len(loader))
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            seen += yb.shape[0]
    model.eval()
    return seen / (time.perf_counter() - t0)


def ceiling(model, shape, batch: int, cfg: TrainConfig, seconds: float = 4.0) -> float:
    m = copy.deepcopy(model).train().to(memory_format=torch.channels_last)
    opt = make_optimizer(m, cfg)
    x = torch.rand(batch, *shape).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,))
    for _ in range(3):
        opt.zero_grad(); F.cross_entropy(m(x), y).backward(); opt.step()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        opt.zero_grad(); F.cross_entropy(m(x), y).backward(); opt.step()
        n += batch
    return n / (time.perf_counter() - t0)


def bench(name: str, data_kw: dict, model_name: str, cfg: TrainConfig, peer_transform, seed: int = 0) -> None:
    raw = load_source(**data_kw)
    s = make_splits(raw.train, raw.test, seed=seed, holdout_fraction=0.0)
    attack = ATTACKS.create("badnets", size=3)
    p = poison(s.train, attack, rate=0.1, target=0, generator=torch.Generator().manual_seed(seed))
    trig = poison_test(s.test, attack, target=0)
    init = build_model(ModelSpec(model_name, p.num_classes, p.shape))
    x_hwc = p.x.permute(0, 2, 3, 1).numpy()  # the peer stamps itself: give it the clean images
    clean_hwc = s.train.x.permute(0, 2, 3, 1).numpy()
    pidx = set(torch.nonzero(p.is_poison).flatten().tolist())
    ds = PeerPoisonedDataset(clean_hwc, s.train.y.numpy(), pidx, 0, 3, peer_transform)
    print(f"\n-- {name}: {len(p)} train images {p.shape}, model {model_name}, {cfg.epochs} epoch(s), "
          f"batch {cfg.batch_size}, crop_padding {cfg.crop_padding}, flip {cfg.flip}")
    ours, peer, res = [], [], {}
    for order in (("ours", "peer"), ("peer", "ours")):
        for who in order:
            m = copy.deepcopy(init)
            if who == "ours":
                h = train(m, p.without_ground_truth(), cfg, seed=seed)
                ours.append(sum(len(p) for _ in h.epochs) / h.seconds)
            else:
                peer.append(peer_train(m, ds, cfg, seed))
            res[who] = (accuracy(predict(m, s.test), s.test.y), accuracy(predict(m, trig), trig.y))
    o, q = float(np.mean(ours)), float(np.mean(peer))
    c = ceiling(init, p.shape, cfg.batch_size, cfg)
    print(f"   ours : {o:8.0f} img/s  (runs: {', '.join(f'{v:.0f}' for v in ours)})  CA {res['ours'][0]:.4f} ASR {res['ours'][1]:.4f}")
    print(f"   peer : {q:8.0f} img/s  (runs: {', '.join(f'{v:.0f}' for v in peer)})  CA {res['peer'][0]:.4f} ASR {res['peer'][1]:.4f}")
    print(f"   ratio ours/peer: {o / q:.2f}x")
    print(f"   ceiling (fwd+bwd+step on one batch repeated): {c:.0f} img/s; ours reaches {100 * o / c:.0f}% of it")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--only", choices=["mnist", "cifar10"])
    args = ap.parse_args()
    shared = need_shared()
    from torchvision import transforms as T

    header("bench_train: in-memory loop vs per-image Dataset/DataLoader")
    if args.only in (None, "mnist"):
        cfg = TrainConfig(epochs=args.epochs, batch_size=128, lr=0.05)
        bench("MNIST (full, shared/data)", {"name": "npz", "path": str(shared / "mnist" / "mnist.npz")}, "cnn", cfg,
              T.Compose([T.ToTensor()]))
    if args.only in (None, "cifar10"):
        cfg = TrainConfig(epochs=args.epochs, batch_size=128, lr=0.05, crop_padding=4, flip=True)
        bench("CIFAR-10 subset (shared/data)", {"name": "cifar10", "root": str(shared)}, "vgg-small", cfg,
              T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor()]))


if __name__ == "__main__":
    main()
