"""The trigger search of :mod:`backdoorlab.defenses.pairwise`: the optimisers and the checks.

:class:`_TriggerSearch` holds the methods that estimate one pattern per (source, target) pair, as
a batch: the min-norm optimisation (proximal step or Adam, restarts), the sparsification and
rescaling by bisection on forward passes, Neural Cleanse's mask formulation and the seed's SGD.
It reads the parameters of :class:`~backdoorlab.defenses.pairwise.PairwiseTriggerInspector`
(``pi``, ``chunk``, ``steps``, ``lr``, ...), whose docstring describes the algorithm and its deviations.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from backdoorlab.defenses.common import checked_logits


def _forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    # float32 logits also under bfloat16 autocast (losses, argmax ties and the NaN check in float32)
    return checked_logits(model(x.contiguous(memory_format=torch.channels_last)).float())


def _norm(v: torch.Tensor, kind: str) -> torch.Tensor:
    flat = v.flatten(1)
    return flat.abs().sum(1) if kind == "l1" else flat.norm(dim=1)


class _TriggerSearch:
    """Pattern search for every pair (a mixin of ``PairwiseTriggerInspector``, which supplies the fields)."""

    # ------------------------------------------------------------------ core
    def _batched(self, model, xs, src, tgt, v, with_grad: bool, loss_kind: str):
        """Loss gradient wrt v (P, C, H, W) and rho (P,) for pairs (src, tgt) in chunks."""
        p, n = src.numel(), xs.shape[1]
        per = max(1, self.chunk // n)
        rho = torch.empty(p)
        grad = torch.zeros_like(v) if with_grad else None
        for s in range(0, p, per):
            sl = slice(s, s + per)
            vv = v[sl].detach().requires_grad_(with_grad)
            x = (xs[src[sl]] + vv[:, None]).clamp(0, 1)  # (p', n, C, H, W)
            pp = x.shape[0]
            with torch.set_grad_enabled(with_grad):
                logits = _forward(model, x.flatten(0, 1)).view(pp, n, -1)
                t = tgt[sl]
                rho[sl] = (logits.argmax(-1) == t[:, None]).float().mean(1).detach()
                if with_grad:
                    if loss_kind == "ce":
                        lt = F.log_softmax(logits, -1).gather(-1, t[:, None, None].expand(pp, n, 1)).squeeze(-1)
                        loss = -lt.mean(1).sum()
                    else:  # seed: -J, the mean target probability
                        pt = F.softmax(logits, -1).gather(-1, t[:, None, None].expand(pp, n, 1)).squeeze(-1)
                        loss = -pt.mean(1).sum()
                    (g,) = torch.autograd.grad(loss, vv)
                    grad[sl] = g
        return grad, rho

    def _rho(self, model, xs, src, tgt, v) -> torch.Tensor:
        with torch.inference_mode():
            return self._batched(model, xs, src, tgt, v, False, "ce")[1]

    def _reaches(self, model, xs, src, tgt, v, block: int = 16) -> torch.Tensor:
        """``rho >= pi`` per pair, exactly as :meth:`_rho` would decide it, but in blocks of images
        with early exit: a pair leaves as soon as it has enough hits, or too many misses, to settle
        the answer (a bisection's failing probes usually fail on the first block)."""
        p, n = src.numel(), xs.shape[1]
        # the smallest hit count h with h / n >= pi, in the float arithmetic of rho's mean
        needed = int(torch.nonzero(torch.arange(n + 1, dtype=torch.float32) / n >= self.pi).flatten()[0])
        hits = torch.zeros(p, dtype=torch.long)
        misses = torch.zeros(p, dtype=torch.long)
        active = torch.arange(p)
        with torch.inference_mode():
            for b0 in range(0, n, block):
                if active.numel() == 0:
                    break
                xb = xs[:, b0 : b0 + block]
                nb = xb.shape[1]
                per = max(1, self.chunk // nb)
                for s in range(0, active.numel(), per):
                    idx = active[s : s + per]
                    x = (xb[src[idx]] + v[idx][:, None]).clamp(0, 1)
                    pred = _forward(model, x.flatten(0, 1)).argmax(-1).view(idx.numel(), nb)
                    h = (pred == tgt[idx][:, None]).sum(1)
                    hits[idx] += h
                    misses[idx] += nb - h
                active = active[(hits[active] < needed) & (misses[active] <= n - needed)]
        return hits >= needed

    def _min_norm_restarts(self, model, xs, src, tgt):
        """``restarts`` runs of :meth:`_optimise`, each from its own random start and on its own
        images (the clean set rotated by ``opt_images``). One run can miss a planted shortcut and
        settle on a natural perturbation; several independent runs make that unlikely. Each pair
        keeps its smallest pattern: every run's pattern is finished (sparsified and rescaled,
        :meth:`_finish`) on ``select_images`` images that no run optimised on, and only the chosen
        run's pattern is finished again on all the clean images (``select_images=None``: every run
        is finished on all images and the smallest kept, ``restarts`` times the cost)."""
        p = src.numel()
        runs = [self._optimise(model, xs.roll(-r * self.opt_images, dims=1), src, tgt, self.seed + 1 + r)
                for r in range(self.restarts)]
        if len(runs) == 1:
            return (*self._finish(model, xs, src, tgt, runs[0]), None)
        stack = torch.stack(runs)  # (R, P, C, H, W)
        r_ = len(runs)
        select = self.select_images is not None
        sel = xs.roll(-r_ * self.opt_images, dims=1)[:, : self.select_images] if select else xs
        fin, ok = self._finish(model, sel, src.repeat(r_), tgt.repeat(r_), stack.flatten(0, 1))
        d = torch.where(ok, _norm(fin, self.norm), torch.full_like(ok, float("inf"), dtype=torch.float32)).view(r_, p)
        pick = d.argmin(0)  # a pair that no run brought to pi keeps run 0
        if not select:
            return fin.view(r_, p, *xs.shape[2:])[pick, torch.arange(p)], ok.view(r_, p).any(0), None
        return (*self._finish(model, xs, src, tgt, stack[pick, torch.arange(p)]), None)

    def _optimise(self, model, xs, src, tgt, init_seed: int) -> torch.Tensor:
        """Minimise CE(t) + lam_p * d(v) per pair on the first ``opt_images`` images per pair, with
        Neural Cleanse's lambda schedule (x1.5 up while rho >= pi, down otherwise) and a cosine-decayed
        step; returns each pair's smallest pattern that reached pi there (or the last one, if none did).

        ``optimizer="prox"`` (default): a normalised proximal gradient step. The CE gradient is
        divided by its largest entry (the most useful pixel moves ``lr``, the others in proportion
        to their gradient) and the L1 penalty is applied as its proximal operator, a soft threshold
        of ``lr * lam_p`` (``lam_p`` starts at ``prox_threshold``): pixels whose gradient stays below
        ``lam_p`` times the largest go exactly to zero. ``"adam"``: Adam on the penalised loss
        (``lam``), the former default. Adam gives every pixel a step of the same size, so the many
        digit-shaped pixels with a weak but consistent gradient move as fast as the few trigger
        pixels whose gradient is much larger; the prox step finds a planted patch from far more
        random starts, and natural pairs also come out smaller (docs/pairwise-audit.md).
        """
        p = src.numel()
        shape = xs.shape[2:]
        n_opt = min(self.opt_images, xs.shape[1])
        xo = xs[:, :n_opt]
        gen = torch.Generator().manual_seed(init_seed)
        # random start: at v = 0 a trigger detector behind a ReLU may get no gradient at all
        v0 = torch.rand(p, *shape, generator=gen) * self.init_scale
        v = (-v0 if self.sign == "negative" else v0).requires_grad_(True)
        prox = self.optimizer == "prox"
        opt = None if prox else torch.optim.Adam([v], lr=self.lr)
        lam = torch.full((p,), self.prox_threshold if prox else self.lam)
        lo_, hi_ = (-1.0 if self.sign != "positive" else 0.0), (1.0 if self.sign != "negative" else 0.0)
        best = torch.zeros(p, *shape)
        best_norm = torch.full((p,), float("inf"))
        per = max(1, self.chunk // n_opt)
        for step in range(self.steps):
            # cosine-decayed step: steps on an L1 penalty oscillate around 0 with the size of the
            # learning rate, a noise floor over every pixel that decaying the rate removes
            lr = self.lr * 0.5 * (1 + math.cos(math.pi * step / self.steps))
            if opt is not None:
                for group in opt.param_groups:
                    group["lr"] = lr
                opt.zero_grad(set_to_none=True)
            elif v.grad is not None:
                v.grad = None
            rho = torch.empty(p)
            for s in range(0, p, per):
                sl = slice(s, s + per)
                x = (xo[src[sl]] + v[sl][:, None]).clamp(0, 1)
                pp = x.shape[0]
                logits = _forward(model, x.flatten(0, 1)).view(pp, n_opt, -1)
                t = tgt[sl]
                rho[sl] = (logits.argmax(-1) == t[:, None]).float().mean(1).detach()
                lt = F.log_softmax(logits, -1).gather(-1, t[:, None, None].expand(pp, n_opt, 1)).squeeze(-1)
                loss = -lt.mean(1)
                if not prox:
                    loss = loss + lam[sl] * _norm(v[sl], self.norm)
                loss.sum().backward()
            with torch.no_grad():
                d = _norm(v, self.norm)
                ok = rho >= self.pi
                better = ok & (d < best_norm)
                best[better] = v[better].detach()
                best_norm[better] = d[better]
                lam = torch.where(ok, lam * 1.5, lam / 1.5).clamp(1e-6, 10.0 if not prox else 1.0)
                if prox:
                    g = v.grad
                    gmax = g.flatten(1).abs().amax(1).clamp_min(1e-12)[:, None, None, None]
                    u = v - lr * g / gmax
                    # the proximal operator of the L1 norm (soft threshold); for l2, shrink the norm
                    tau = (lr * lam)[:, None, None, None]
                    if self.norm == "l1":
                        u = u.sign() * (u.abs() - tau).clamp_min(0)
                    else:
                        nrm = u.flatten(1).norm(dim=1).clamp_min(1e-12)[:, None, None, None]
                        u = u * (1 - tau * math.sqrt(u[0].numel()) / nrm).clamp_min(0)
                    v.copy_(u)
            if opt is not None:
                opt.step()
            with torch.no_grad():
                v.clamp_(lo_, hi_)
        found = torch.isfinite(best_norm)
        best[~found] = v.detach()[~found]
        return best

    def _finish(self, model, xs, src, tgt, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sparsify each pattern (:meth:`_sparsify`) and rescale it to the smallest multiple in (0, 1]
        that still reaches pi (:meth:`_shrink`), both on ``xs`` (forward passes only). Returns the
        patterns and whether each reaches pi on ``xs``."""
        v, found = self._sparsify(model, xs, src, tgt, v)
        # a sparsified pattern was verified by its last probe; only the patterns returned unchanged
        # (not reaching pi even amplified) are checked as they are
        rest = torch.nonzero(~found).flatten()
        if rest.numel():
            found[rest] = self._reaches(model, xs, src[rest], tgt[rest], v[rest])
        idx = torch.nonzero(found).flatten()
        if idx.numel():
            hi = self._shrink(model, xs, src[idx], tgt[idx], v[idx], torch.zeros(idx.numel()))
            v = v.clone()
            v[idx] = v[idx] * hi[:, None, None, None]
        return v, found

    def _shrink(self, model, xs, src, tgt, v, lo: torch.Tensor) -> torch.Tensor:
        """Smallest scale in (lo, 1] of each pattern ``v`` that still reaches pi on ``xs`` (bisection)."""
        hi = torch.ones_like(lo)
        for _ in range(self.bisection_steps):
            mid = (lo + hi) / 2
            ok = self._reaches(model, xs, src, tgt, v * mid[:, None, None, None])
            hi = torch.where(ok, mid, hi)
            lo = torch.where(ok, lo, mid)
        return hi

    def _min_mask(self, model, xs, src, tgt):
        """Neural Cleanse's formulation per pair: x' = (1 - m) x + m p, m in [0,1]^(H,W), p in
        [0,1]^(C,H,W) (sigmoids of free parameters), loss CE(t) + lam_p * |m|_1 with the lambda
        schedule; the statistic is |m|_1 of the smallest mask reaching pi, the pattern m * p."""
        p_ = src.numel()
        c, h, w = xs.shape[2:]
        n_opt = min(self.opt_images, xs.shape[1])
        xo = xs[:, :n_opt]
        gen = torch.Generator().manual_seed(self.seed + 1)
        mp = torch.full((p_, 1, h, w), -2.0).add_(torch.randn(p_, 1, h, w, generator=gen) * 0.5).requires_grad_(True)
        pp_ = (torch.randn(p_, c, h, w, generator=gen) * 0.5).requires_grad_(True)
        opt = torch.optim.Adam([mp, pp_], lr=self.lr)
        lam = torch.full((p_,), self.lam)
        best_m = torch.zeros(p_, 1, h, w)
        best_p = torch.zeros(p_, c, h, w)
        best_norm = torch.full((p_,), float("inf"))
        per = max(1, self.chunk // n_opt)
        for step in range(self.steps):
            for group in opt.param_groups:
                group["lr"] = self.lr * 0.5 * (1 + math.cos(math.pi * step / self.steps))
            opt.zero_grad(set_to_none=True)
            rho = torch.empty(p_)
            for s in range(0, p_, per):
                sl = slice(s, s + per)
                m = torch.sigmoid(mp[sl])
                pat = torch.sigmoid(pp_[sl])
                x = (1 - m[:, None]) * xo[src[sl]] + (m * pat)[:, None]
                k = x.shape[0]
                logits = _forward(model, x.flatten(0, 1)).view(k, n_opt, -1)
                t = tgt[sl]
                rho[sl] = (logits.argmax(-1) == t[:, None]).float().mean(1).detach()
                lt = F.log_softmax(logits, -1).gather(-1, t[:, None, None].expand(k, n_opt, 1)).squeeze(-1)
                (-lt.mean(1) + lam[sl] * m.flatten(1).sum(1)).sum().backward()
            with torch.no_grad():
                m = torch.sigmoid(mp)
                d = m.flatten(1).sum(1)
                ok = rho >= self.pi
                better = ok & (d < best_norm)
                best_m[better] = m[better]
                best_p[better] = torch.sigmoid(pp_)[better]
                best_norm[better] = d[better]
                lam = torch.where(ok, lam * 1.5, lam / 1.5).clamp(1e-6, 10.0)
            opt.step()
        found = torch.isfinite(best_norm)
        with torch.no_grad():
            best_m[~found] = torch.sigmoid(mp)[~found]
            best_p[~found] = torch.sigmoid(pp_)[~found]
        # check on all images
        rho_all = torch.empty(p_)
        per_all = max(1, self.chunk // xs.shape[1])
        with torch.inference_mode():
            for s in range(0, p_, per_all):
                sl = slice(s, s + per_all)
                x = (1 - best_m[sl][:, None]) * xs[src[sl]] + (best_m[sl] * best_p[sl])[:, None]
                k = x.shape[0]
                logits = _forward(model, x.flatten(0, 1)).view(k, xs.shape[1], -1)
                rho_all[sl] = (logits.argmax(-1) == tgt[sl][:, None]).float().mean(1)
        found = found & (rho_all >= self.pi)
        return best_m * best_p, found, best_m.flatten(1).sum(1)

    def _sparsify(self, model, xs, src, tgt, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keep each pattern's k largest entries (by magnitude), k the smallest that still reaches pi
        on ``xs`` (bisection on k, forward passes only). Removes the optimiser's leftover noise, so
        that d(v) measures what the pair really needs: a planted stamp needs a handful of pixels.
        A pattern that misses pi even whole (amplified) is returned unchanged. Returns the patterns
        and whether each sparsified one reaches pi (True for every pattern that was sparsified)."""
        p = v.shape[0]
        flat = v.flatten(1)
        order = flat.abs().argsort(1, descending=True)
        ranks = torch.empty_like(order)
        ranks.scatter_(1, order, torch.arange(flat.shape[1]).expand_as(order))
        # the kept entries may be amplified (x2, clipped) before the final rescaling shrinks them again
        amp = 2.0
        reach = self._reaches(model, xs, src, tgt, (amp * v).clamp(-1, 1))
        lo = torch.zeros(p, dtype=torch.long)
        # the top-k of a pattern with nnz non-zero entries is the whole pattern for every k >= nnz
        hi = (flat != 0).sum(1).clamp_min(1)
        lo[~reach] = hi[~reach]  # nothing to bisect
        while True:
            # only the pairs still bisecting are evaluated; k to a relative precision of
            # ``sparsify_tolerance`` (the statistic is a log size), exact for small patterns
            act = torch.nonzero((hi - lo > 1) & (hi.double() > lo.double() * (1 + self.sparsify_tolerance))).flatten()
            if act.numel() == 0:
                break
            # geometric midpoint: k spans 1 to hundreds of pixels
            mid = (lo[act].clamp_min(1).double() * hi[act].double()).sqrt().long()
            mid = torch.minimum(torch.maximum(mid, lo[act] + 1), hi[act] - 1)
            vk = (flat[act] * (ranks[act] < mid[:, None])).view(-1, *v.shape[1:])
            ok = self._reaches(model, xs, src[act], tgt[act], (amp * vk).clamp(-1, 1))
            hi[act] = torch.where(ok, mid, hi[act])
            lo[act] = torch.where(ok, lo[act], mid)
        out = (amp * flat * (ranks < hi[:, None])).view_as(v).clamp(-1, 1)
        return torch.where(reach[:, None, None, None], out, v), reach.clone()

    def _seed(self, model, xs, src, tgt):
        p = src.numel()
        v = torch.zeros(p, *xs.shape[2:])
        found = torch.zeros(p, dtype=torch.bool)
        active = torch.arange(p)
        for step in range(self.seed_steps):
            if active.numel() == 0:
                break
            g, _ = self._batched(model, xs, src[active], tgt[active], v[active], True, "seed")
            v[active] = v[active] - self.seed_lr * g  # SGD on -J, as the seed's Patch module
            rho = self._rho(model, xs, src[active], tgt[active], v[active])
            done = rho >= self.pi
            found[active[done]] = True
            active = active[~done]
        return v, found
