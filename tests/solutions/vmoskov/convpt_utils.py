import cv2
import numpy as np
import torch
import torch.nn as nn
import os
import matplotlib.pyplot as plt


# [trimmed for this test copy: lines 9-108, draw_image, show_highest_loss_images, plot_training_progress]


def draw_conv_filters(epoch, step, conv_layer, save_dir):
    weights = conv_layer.weight.data.cpu().numpy()
    num_filters, num_channels, k, _ = weights.shape  # (filters, channels, height, width)
    
    assert k == weights.shape[3], "Filters should be square"
    
    num_rows, num_cols = 2, 8  
    assert num_filters >= num_rows * num_cols, "Not enough filters to fill the grid"

    border_size = 1  
    filter_images = []

    for i in range(num_rows * num_cols):
        img = weights[i]  # Shape: (C, k, k)

        # Normalize per-channel
        for c in range(num_channels):
            img[c] -= img[c].min()
            img[c] /= img[c].max() if img[c].max() > 0 else 1  # Avoid division by zero
            img[c] *= 255

        img = np.transpose(img, (1, 2, 0))  # Convert from (C, H, W) to (H, W, C)
        img = img.astype(np.uint8)
        # img = np.clip(img * 255, 0, 255).astype(np.uint8)

        # If grayscale (1 channel), convert to RGB by repeating channels
        if num_channels == 1:
            img = np.repeat(img, 3, axis=2)

        filter_images.append(img)

    filter_h, filter_w, _ = filter_images[0].shape

    # Create a blank black canvas with separators
    canvas_h = num_rows * filter_h + (num_rows - 1) * border_size
    canvas_w = num_cols * filter_w + (num_cols - 1) * border_size
    canvas = np.zeros((canvas_h, canvas_w, 3), dtype=np.uint8)

    for row in range(num_rows):
        for col in range(num_cols):
            x = col * (filter_w + border_size)
            y = row * (filter_h + border_size)
            canvas[y:y + filter_h, x:x + filter_w] = filter_images[row * num_cols + col]

    cv2.imwrite(f'{save_dir}/conv1_epoch_{epoch:02d}_step_{step:06d}_input_000.png', canvas)


def multiclass_hinge_loss(logits, target, delta=1.0):
    """
    Args:
        logits: torch.Tensor with shape (B, C), where B is batch size, and C is number of classes.
        target: torch.LongTensor with shape (B, ) representing ground truth labels.
        delta: Hyperparameter.
    Returns:
        Loss as scalar torch.Tensor.
    """
    batch_size = logits.size(0)
    num_classes = logits.size(1)

    # Create a mask for the target class
    target_mask = torch.zeros_like(logits)
    target_mask[torch.arange(batch_size), target] = 1  # Set the target class to 1

    correct_class_logits = torch.sum(logits * target_mask, dim=1, keepdim=True)

    margins = logits - correct_class_logits + delta
    margins *= (1 - target_mask)  # zero out the target class margin
    hinge_loss = torch.clamp(margins, min=0)  # Apply ReLU to the margins

    loss = torch.sum(hinge_loss, dim=1)  # Sum over classes
    loss = torch.mean(loss)  # Average over batch
    return loss


# [trimmed for this test copy: lines 183-272, train and evaluate]
