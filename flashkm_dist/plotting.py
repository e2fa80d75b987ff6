"""Convergence plot of a fit's `history_` (matplotlib is an optional dependency: the `plot` extra)."""
from __future__ import annotations


def plot_history(history, path) -> None:
    """Inertia and squared centre shift per iteration, on log scales, written as a PNG."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ImportError("plot_history needs matplotlib: pip install 'flashkm-dist[plot]'") from err
    if not history:
        raise ValueError("history is empty: fit the model first")
    its = [h["iteration"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    ax1.plot(its, [h["inertia"] for h in history], marker="o")
    ax1.set(xlabel="iteration", ylabel="inertia", title="Inertia", yscale="log")
    ax2.plot(its, [max(h["center_shift"], 1e-300) for h in history], marker="o", color="tab:orange")
    ax2.set(xlabel="iteration", ylabel="sum of squared centre shifts", title="Centre shift", yscale="log")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
