from pathlib import Path
import os
from torchvision import datasets, transforms
import torch
from torch.utils.data import random_split, DataLoader
import time
import torch.nn as nn
import math
import numpy as np
import skimage.io
import torch.optim as optim
import matplotlib.pyplot as plt

DATA_DIR = Path(__file__).parent / 'datasets'
SAVE_DIR = Path(__file__).parent / 'out'
os.makedirs(name=SAVE_DIR, exist_ok=True)

config = {
    'max_epochs': 8,
    'batch_size': 50,
    'weight-decay': 1e-3,
    'lr_start': 1e-2
}

torch.manual_seed(int(time.time() * 1e6) % 2 ** 31)

# The 10 different classes represent airplanes, cars, birds, cats, deer, dogs, frogs, horses, ships, and trucks

# ds = datasets.CIFAR10(root=DATA_DIR, train=True, download=True, transform=transforms.ToTensor())
# train_tensor = torch.stack([img for img, _ in ds], dim=0)
# ds_mean = train_tensor.mean(dim=(0, 2, 3))
# ds_std = train_tensor.std(dim=(0, 2, 3))
# print(f"Mean: {ds_mean[0]:.27}, {ds_mean[1]:.27}, {ds_mean[2]:.27}")
# print(f"Std: {ds_std[0]:.27}, {ds_std[1]:.27}, {ds_std[2]:.27}")
ds_mean = (0.4914008080959320068359375, 0.4821589887142181396484375, 0.44653093814849853515625)
ds_std = (0.24703224003314971923828125, 0.24348513782024383544921875, 0.2615878582000732421875)

transform = transforms.Compose([
    transforms.ToTensor(),
    transforms.Normalize(mean=ds_mean, std=ds_std)
])

ds_train_valid = datasets.CIFAR10(root=DATA_DIR, train=True, transform=transform, download=True)
ds_test = datasets.CIFAR10(root=DATA_DIR, train=False, transform=transform, download=True)
ds_train, ds_valid = random_split(dataset=ds_train_valid, lengths=[45000, 5000])

loader_train = DataLoader(dataset=ds_train, batch_size=config['batch_size'], shuffle=True)
loader_valid = DataLoader(dataset=ds_valid, batch_size=config['batch_size'], shuffle=False)
loader_test = DataLoader(dataset=ds_test, batch_size=config['batch_size'], shuffle=False)

# [trimmed for this test copy: class ConvolutionModel and def draw_conv_filters]

def multiclass_hinge_loss(logits, target, delta=1.0):
    mask = torch.zeros_like(logits, dtype=torch.bool)
    mask.scatter_(1, target.unsqueeze(1), True)
    
    correct = logits.masked_select(mask).view(-1, 1)
    incorrect = logits.masked_select(~mask).view(logits.size(0), -1)
    
    margins = torch.relu(incorrect - correct + delta)
    loss = margins.sum(dim=1).mean()
    return loss

# [trimmed for this test copy: def evaluate, def plot_training_progress, and the training loop of the
#  __main__ block below after its first lines]

if __name__=="__main__":
    device = torch.device('cpu')
    print(f'Device: {device}')
    model = ConvolutionModel().to(device)
