"""Pure tensor trigger operations. Each takes float (B, C, H, W) in [0, 1] and returns a new
tensor of the same shape, dtype and range; none modifies its input or does I/O."""

from __future__ import annotations

import torch


def square_mask(size: int) -> torch.Tensor:
    """(size, size) all-ones mask."""
    return torch.ones(size, size)


def ball_mask(size: int) -> torch.Tensor:
    """(size, size) disc inscribed in the square (centre pixel-centred, radius size/2)."""
    c = (size - 1) / 2.0
    ii, jj = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    return (((ii - c) ** 2 + (jj - c) ** 2) <= (size / 2.0) ** 2 + 1e-6).float()


def chessboard(h: int, w: int) -> torch.Tensor:
    """(h, w) alternating 0/1 board with a 1 in the top-left corner."""
    ii, jj = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return ((ii + jj) % 2 == 0).float()


def stamp(x: torch.Tensor, pattern: torch.Tensor, mask: torch.Tensor, top: torch.Tensor | int, left: torch.Tensor | int) -> torch.Tensor:
    """Blend a small ``pattern`` (C|1, h, w) through ``mask`` (h, w) in [0,1] into ``x`` at (top, left).

    ``top``/``left`` are ints (same place for all) or int64 tensors (B,) (one place per image).
    x' = (1 - m) x + m p inside the window; unchanged elsewhere.
    """
    b, c, hh, ww = x.shape
    ph, pw = mask.shape
    out = x.clone()
    pat = pattern.to(x).expand(c, ph, pw)
    m = mask.to(x)
    if isinstance(top, int) and isinstance(left, int):
        win = out[:, :, top:top + ph, left:left + pw]
        out[:, :, top:top + ph, left:left + pw] = win * (1 - m) + pat * m
        return out
    top_t = torch.as_tensor(top).long().expand(b)
    left_t = torch.as_tensor(left).long().expand(b)
    rows = (top_t[:, None] + torch.arange(ph))[:, :, None]  # (B, h, 1)
    cols = (left_t[:, None] + torch.arange(pw))[:, None, :]  # (B, 1, w)
    bi = torch.arange(b)[:, None, None]
    win = out[bi, :, rows, cols]  # (B, h, w, C)
    new = win * (1 - m)[None, :, :, None] + pat.permute(1, 2, 0)[None] * m[None, :, :, None]
    out[bi, :, rows, cols] = new
    return out


def add_clipped(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """[x + v] clipped to [0, 1]; ``v`` broadcasts against (B, C, H, W)."""
    return (x + v.to(x)).clamp_(0.0, 1.0)


def blend(x: torch.Tensor, k: torch.Tensor, alpha: float) -> torch.Tensor:
    """(1 - alpha) x + alpha k."""
    return (1.0 - alpha) * x + alpha * k.to(x)


def scale_clipped(x: torch.Tensor, factor: float) -> torch.Tensor:
    """clip(factor * x) to [0, 1]."""
    return (x * factor).clamp_(0.0, 1.0)


def sinusoid(h: int, w: int, delta: float, freq: float) -> torch.Tensor:
    """(h, w) horizontal sinusoid v(i, j) = delta * sin(2 pi j f / w), j = 0..w-1 (Barni et al. 2019)."""
    j = torch.arange(w, dtype=torch.float32)
    return (delta * torch.sin(2.0 * torch.pi * j * freq / w)).expand(h, w).clone()


def identity_grid(h: int, w: int) -> torch.Tensor:
    """(1, h, w, 2) sampling grid of ``grid_sample`` (x, y order, align_corners=True) that copies the image."""
    ys = torch.linspace(-1.0, 1.0, h)
    xs = torch.linspace(-1.0, 1.0, w)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack((gx, gy), dim=-1)[None]


def warp(x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Resample ``x`` (B, C, H, W) at ``grid`` ((1|B), H, W, 2) in [-1, 1] (bilinear, align_corners=True)."""
    g = grid.to(x).expand(x.shape[0], -1, -1, -1)
    return torch.nn.functional.grid_sample(x, g, mode="bilinear", padding_mode="border", align_corners=True).clamp_(0.0, 1.0)


def window_means(x: torch.Tensor, size: int) -> torch.Tensor:
    """Mean intensity (over channels and the window) of every ``size`` x ``size`` window:
    (B, C, H, W) -> (B, H - size + 1, W - size + 1); entry (r, c) is the window with top-left (r, c)."""
    return torch.nn.functional.avg_pool2d(x.mean(1, keepdim=True), size, stride=1)[:, 0]
