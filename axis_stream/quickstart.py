"""The main job on an embedded default: fold a few task matrices it builds itself and summarise."""

from __future__ import annotations

import torch

from axis_stream import stage1


def synthetic_task_matrices(count: int, shape: tuple[int, int], seed: int = 0) -> list[torch.Tensor]:
    """Task matrices with a slowly decaying spectrum, like the difference of a fine-tune and its base."""
    g = torch.Generator().manual_seed(seed)
    m, n = shape
    r = min(m, n)
    decay = torch.arange(1, r + 1, dtype=torch.float32) ** -0.7
    out = []
    for _ in range(count):
        u = torch.linalg.qr(torch.randn(m, r, generator=g)).Q
        v = torch.linalg.qr(torch.randn(n, r, generator=g)).Q
        out.append((u * decay) @ v.T)
    return out


def fold_summary(count: int = 5, shape: tuple[int, int] = (256, 128), fraction: float = 0.10
                 ) -> list[str]:
    """Fold ``count`` synthetic matrices one at a time and describe each step, one line per fold."""
    k = stage1.k_for(shape, fraction)
    lines = [f"folding {count} task matrices of shape {shape} with k = {k}"]
    current = None
    for i, delta in enumerate(synthetic_task_matrices(count, shape)):
        current = stage1.fold(current, delta, k, svd="randomized")
        st = current.stats
        lines.append(f"  fold {i + 1}: rank {current.rank}, {st.new_kept} of {k} components from the new "
                     f"matrix, {st.energy_kept:.1%} of its energy kept, svd {st.svd_method}")
    lines.append(f"basis: rank {current.rank}, {current.nbytes / 1024:.1f} KiB "
                 f"(dense would be {shape[0] * shape[1] * 4 / 1024:.1f} KiB)")
    return lines
