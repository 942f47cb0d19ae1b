"""PNG figures of IJB results: ROC (TAR vs FAR, 1:1) and DIR (TPIR vs FPIR, 1:N), several curves each."""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from utils.io import atomic_path

ROC_GRID = np.logspace(-6, 0, 400)


def roc_on_grid(fpr, tpr, grid=ROC_GRID):
    """The ROC staircase sampled at ``grid``: best TAR with FAR ≤ each grid value."""
    return tpr[np.maximum(np.searchsorted(fpr, grid, "right") - 1, 0)]


def _save(fig, path):
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path


def plot_roc(curves, path, title="IJB 1:1 verification"):
    """``curves``: list of (label, fpr, tpr). Log-scale FAR axis from 1e-6."""
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for label, fpr, tpr in curves:
        ax.plot(ROC_GRID, roc_on_grid(np.asarray(fpr), np.asarray(tpr)), label=label, linewidth=1.2)
    ax.set(xscale="log", xlim=(1e-6, 1), ylim=(0, 1.01), xlabel="False accept rate",
           ylabel="True accept rate", title=title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return _save(fig, path)


def plot_dir(curves, path, title="IJB 1:N identification"):
    """``curves``: list of (label, fpir, tpir). Log-scale FPIR axis."""
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for label, fpir, tpir in curves:
        ax.plot(fpir, tpir, label=label, linewidth=1.2, drawstyle="steps-post")
    ax.set(xscale="log", ylim=(0, 1.01), xlabel="False positive identification rate",
           ylabel="True positive identification rate", title=title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return _save(fig, path)
