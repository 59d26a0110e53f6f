"""Figures shared by the scripts: filter grids and training curves, saved as PNG."""
import math
import os

import matplotlib

matplotlib.use("Agg")  # scripts run headless; never open a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import skimage.io  # noqa: E402


def filter_grid(weights, cols=8, border=1, scale=8):
    """Filters (F, C, k, k) -> one uint8 image: a grid of filters on a black border.

    All filters share one min-max scaling, so their contrasts can be compared.
    C == 3 gives an RGB image, otherwise the first input channel in grey.
    Every weight becomes a scale x scale block, so a 5x5 filter stays sharp in
    any viewer (no smoothing needed, unlike the lab's 1-pixel-per-weight images).
    """
    w = np.asarray(weights, dtype=np.float64)
    num_filters, channels, k, _ = w.shape
    w = w.transpose(0, 2, 3, 1) if channels == 3 else w[:, 0, :, :, None]
    w = (w - w.min()) / max(w.max() - w.min(), 1e-12)
    rows = math.ceil(num_filters / cols)
    img = np.zeros((rows * (k + border) + border, cols * (k + border) + border, w.shape[-1]))
    for i in range(num_filters):
        r = border + (i // cols) * (k + border)
        c = border + (i % cols) * (k + border)
        img[r:r + k, c:c + k] = w[i]
    img = np.kron(img, np.ones((scale, scale, 1)))
    img = np.round(img * 255).astype(np.uint8)
    return img[..., 0] if img.shape[-1] == 1 else img


def save_filter_grid(path, weights, **grid_options):
    skimage.io.imsave(path, filter_grid(weights, **grid_options), check_contrast=False)


def plot_training_progress(path, history, title=None):
    """The lab's figure: loss, accuracy and (if recorded) learning rate per epoch, train vs validation.

    history: lists keyed train_loss, valid_loss, train_acc, valid_acc and optionally lr.
    """
    panels = [("Cross-entropy loss", "loss"), ("Accuracy", "acc")] + ([("Learning rate", "lr")] if history.get("lr") else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4))
    for ax, (panel_title, key) in zip(axes, panels):
        if key == "lr":
            epochs = np.arange(1, len(history["lr"]) + 1)
            ax.plot(epochs, history["lr"], marker="o", color="m")
            ax.set_yscale("log")
        else:
            for split, color in (("train", "m"), ("valid", "c")):
                values = history.get(f"{split}_{key}", [])
                ax.plot(np.arange(1, len(values) + 1), values, marker="o", color=color,
                        label="train" if split == "train" else "validation")
            ax.legend()
        ax.set_title(panel_title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return os.path.abspath(path)
