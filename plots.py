"""Figures shared by the scripts, saved as PNG (atomically): filter grids, training curves, images.

The lab's own functions are here under the lab's names and signatures: draw_conv_filters(epoch, step,
weights, save_dir), plot_training_progress(save_dir, data) and draw_image(img, mean, std).
"""
import math
import os

import matplotlib

if not os.environ.get('DISPLAY') and not os.environ.get('MPLBACKEND'):
    matplotlib.use("Agg")  # no screen: draw into files only
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import skimage.io  # noqa: E402

import cli  # noqa: E402


def label(text):
    """text (a class name from a data file) as matplotlib shows it literally: '$' would start mathtext."""
    return str(text).replace('$', r'\$')


def filter_grid(weights, cols=8, border=1, scale=8, value_range=None):
    """Filters (F, C, k, k) -> one uint8 image: a grid of filters on a black border.

    All filters share one min-max scaling, so their contrasts can be compared; value_range (low, high) sets
    that scale instead (to compare grids with each other), values outside it clipped.
    C == 3 gives an RGB image, otherwise the first input channel in grey.
    Every weight becomes a scale x scale block, so a 5x5 filter stays sharp in
    any viewer (no smoothing needed, unlike the lab's 1-pixel-per-weight images).
    """
    w = np.asarray(weights, dtype=np.float64)
    num_filters, channels, k, _ = w.shape
    w = w.transpose(0, 2, 3, 1) if channels == 3 else w[:, 0, :, :, None]
    low, high = value_range or (w.min(), w.max())
    w = np.clip((w - low) / max(high - low, 1e-12), 0, 1)
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
    image = filter_grid(weights, **grid_options)
    cli.atomic_write(path, lambda tmp_path: skimage.io.imsave(tmp_path, image, check_contrast=False))


def draw_conv_filters(epoch, step, weights, save_dir, prefix='conv1'):
    """The lab's function: conv filters (F, C, k, k) as '<prefix>_epoch_EE_step_SSSSSS.png' in save_dir."""
    path = os.path.join(save_dir, '%s_epoch_%02d_step_%06d.png' % (prefix, epoch, step))
    save_filter_grid(path, weights)
    return path


def draw_image(img, mean, std, path=None):
    """The lab's function: one normalised image (3, H, W) with its normalisation undone, mean and std per channel
    on the 0-255 scale of the pixels, as the lab's code computes data_mean and data_std. Saves it as a PNG at
    `path`, or without one shows it in a window (as the lab's skimage.io.imshow does); returns it, uint8 RGB
    (H, W, 3)."""
    img = img.transpose(1, 2, 0) * std + mean
    img = np.clip(np.round(img), 0, 255).astype(np.uint8)
    if path is not None:
        cli.atomic_write(path, lambda tmp_path: skimage.io.imsave(tmp_path, img, check_contrast=False))
    elif plt.get_backend().lower() != 'agg':
        plt.imshow(img, interpolation='nearest')
        plt.show()
    return img


def _plot_curves(ax, history, key, panel_title):
    """One panel of a progress figure: the learning rate (log scale), or train vs validation `key`."""
    if key == "lr":
        ax.plot(np.arange(1, len(history["lr"]) + 1), history["lr"], marker="o", color="m")
        ax.set_yscale("log")
    else:
        for split, color in (("train", "m"), ("valid", "c")):
            values = history.get(f"{split}_{key}", [])
            ax.plot(np.arange(1, len(values) + 1), values, marker="o", color=color,
                    label="train" if split == "train" else "validation")
        ax.legend()
    _epoch_axis(ax, panel_title)


def _epoch_axis(ax, panel_title):
    ax.set_title(panel_title)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.grid(alpha=0.3)


def _save(fig, path, title=None):
    if title:  # room above the panels' own titles for each line of it
        fig.suptitle(title)
        fig.tight_layout(rect=(0, 0, 1, 1 - 0.3 * (title.count('\n') + 1) / fig.get_figheight()))
    else:
        fig.tight_layout()
    cli.atomic_write(path, lambda tmp_path: fig.savefig(tmp_path, dpi=100))
    plt.close(fig)
    return os.path.abspath(path)


def history(records, keys=("train_loss", "valid_loss", "train_acc", "valid_acc", "lr", "reg_loss",
                           "valid_precision", "valid_recall")):
    """run.Run's per-epoch records -> the lab's plot data: {key: [value of each epoch]}."""
    return {key: [record[key] for record in records] for key in keys if records and key in records[0]}


def plot_training_progress(save_dir, data, loss_name="Cross-entropy loss", title=None):
    """The lab's figure, saved as <save_dir>/training_plot.png: per epoch, the data loss and the accuracy
    (train vs validation) and the learning rate; a fourth panel shows the L2 term of the loss where it is on
    (not part of the loss panel), else the validation macro precision and recall.

    data: lists keyed train_loss, valid_loss (the data loss alone), train_acc, valid_acc, lr, and
    optionally reg_loss, valid_precision, valid_recall (history() makes it from run.Run's records).
    """
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    l2 = any(data.get("reg_loss", []))
    for ax, (panel_title, key) in zip(axes.flat, [(loss_name + (" (data term, without L2)" if l2 else ""), "loss"),
                                                  ("Accuracy", "acc"), ("Learning rate", "lr")]):
        _plot_curves(ax, data, key, panel_title)
    ax = axes[1, 1]
    if l2:
        ax.plot(np.arange(1, len(data["reg_loss"]) + 1), data["reg_loss"], marker="o", color="tab:green")
        _epoch_axis(ax, "L2 term (lambda/2) * sum of squared weights")
    elif "valid_precision" in data:
        for key, color in (("valid_precision", "tab:blue"), ("valid_recall", "tab:orange")):
            ax.plot(np.arange(1, len(data[key]) + 1), data[key], marker="o", color=color, label=key.split("_")[-1])
        ax.legend()
        _epoch_axis(ax, "Validation macro-averaged precision and recall")
    else:
        ax.axis("off")
    return _save(fig, os.path.join(save_dir, "training_plot.png"), title)


def save_filter_panels(path, panels, title=None):
    """Filter grids side by side on one colour scale: panels is a list of (title, filters (F, C, k, k)); black is
    -m, mid grey 0 and white +m, m the largest |weight| of all panels, so a grid of smaller weights is greyer."""
    largest = max(np.abs(filters).max() for _, filters in panels)
    fig, axes = plt.subplots(1, len(panels), figsize=(3 * len(panels), 3.6), squeeze=False)
    for ax, (panel_title, filters) in zip(axes.flat, panels):
        ax.imshow(filter_grid(filters, cols=4, value_range=(-largest, largest)), cmap="gray", vmin=0, vmax=255,
                  interpolation="nearest")
        ax.set_title(panel_title, fontsize=9)
        ax.axis("off")
    return _save(fig, path, title)


def draw_net(path, rows, title=None):
    """The lab's "sketch the model": one box per layer, input at the top, each with its output shape (without
    the batch), parameters and receptive field; rows from summary.model_summary."""
    layer_rows = [row for row in rows if row['name'] != 'loss']
    fig, ax = plt.subplots(figsize=(6.4, 0.75 * len(layer_rows) + 0.6))
    for i, row in enumerate(layer_rows):
        y = len(layer_rows) - 1 - i
        shape = ' x '.join(map(str, row['shape'][1:]))
        if row['name'] == 'input':
            rf = ''
        else:
            rf = ", sees all pixels" if row['rf'] is None else f", sees {row['rf']}x{row['rf']} pixels"
        params = f"{row['params']:,} parameters" if row['params'] else 'no parameters'
        ax.add_patch(matplotlib.patches.FancyBboxPatch((0.05, y + 0.15), 0.9, 0.6, boxstyle="round,pad=0.02",
                                                       facecolor="#dbe9f6" if row['params'] else "#f2f2f2",
                                                       edgecolor="#4a6f8a"))
        ax.text(0.08, y + 0.45, row['name'], fontsize=10, fontweight="bold", va="center")
        ax.text(0.3, y + 0.55, shape, fontsize=9, va="center")
        ax.text(0.3, y + 0.32, params + rf, fontsize=8, va="center", color="#444444")
        if i:
            ax.annotate("", xy=(0.5, y + 0.75), xytext=(0.5, y + 1.15),
                        arrowprops=dict(arrowstyle="->", color="#4a6f8a"))
    ax.set_xlim(0, 1)
    ax.set_ylim(0, len(layer_rows))
    ax.axis("off")
    total = sum(row['params'] for row in rows)
    return _save(fig, path, title or f"The lab's net: {total:,} parameters\n"
                                     f"(shapes per image; 'sees': the receptive field in input pixels)")


def save_confusion_matrix(path, confusion, class_names, title=None):
    """Heatmap of a confusion matrix (rows: true class, columns: predicted), counts written in the cells."""
    confusion = np.asarray(confusion)
    fig, ax = plt.subplots(figsize=(8, 7))
    image = ax.imshow(confusion, cmap="Blues")
    fig.colorbar(image, ax=ax, fraction=0.046)
    ticks = np.arange(len(class_names))
    ax.set_xticks(ticks, [label(name) for name in class_names], rotation=45, ha="right")
    ax.set_yticks(ticks, [label(name) for name in class_names])
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    threshold = confusion.max() / 2
    for (i, j), count in np.ndenumerate(confusion):
        ax.text(j, i, str(count), ha="center", va="center", fontsize=8,
                color="white" if count > threshold else "black")
    return _save(fig, path, title)


def save_image_grid(path, images, titles, cols=5, title=None):
    """uint8 RGB images (N, H, W, 3) in a grid, each with its (multi-line) title."""
    rows = max(1, math.ceil(len(images) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, image_title in zip(axes.flat, images, titles):
        ax.imshow(image, interpolation="nearest")
        ax.set_title(label(image_title), fontsize=8)
    return _save(fig, path, title)


def plot_run_comparison(path, histories, loss_titles, title=None):
    """Several runs side by side: validation accuracy of all runs in one panel, then each run's own
    loss (train and validation) in a panel of its own, since different losses have different scales.

    histories: {run name: history()'s dict}; loss_titles: {run name: name of its loss}.
    """
    fig, axes = plt.subplots(1, 1 + len(histories), figsize=(5 * (1 + len(histories)), 4))
    for name, history in histories.items():
        values = history["valid_acc"]
        axes[0].plot(np.arange(1, len(values) + 1), values, marker="o", label=name)
    axes[0].legend()
    _epoch_axis(axes[0], "Validation accuracy")
    for ax, (name, history) in zip(axes[1:], histories.items()):
        _plot_curves(ax, history, "loss", f"{name}: {loss_titles[name]}")
    return _save(fig, path, title)


def plot_time_to_accuracy(path, runs, targets=(), title=None):
    """Test accuracy and training loss against training seconds, one line per run, with the target
    accuracies as dotted lines. runs: {label: history with lists seconds, test_acc, train_loss}."""
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(12, 4.5))
    for label, curve in runs.items():
        ax_acc.plot(curve["seconds"], curve["test_acc"], marker="o", label=label)
        ax_loss.plot(curve["seconds"], curve["train_loss"], marker="o", label=label)
    for target in targets:
        ax_acc.axhline(target, color="grey", linewidth=0.8, linestyle=":")
    ax_acc.set(title="Test accuracy", xlabel="training seconds (evaluation excluded)", ylabel="accuracy")
    ax_loss.set(title="Training loss (label-smoothed, mean since last point)", xlabel="training seconds")
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
        ax.legend()
    return _save(fig, path, title)
