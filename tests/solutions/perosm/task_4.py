import os
import pickle
import numpy as np
import skimage as ski
import skimage.io
import math
import torch
import torchvision
from torch import nn
from torch.utils.data import DataLoader
import torch.nn.functional as F
from torchvision.datasets import CIFAR10
import matplotlib.pyplot as plt
import skimage as ski
import skimage.io
from torch.utils.data import TensorDataset, DataLoader

device = 'cuda' if torch.cuda.is_available() else 'cpu'

# [trimmed for this test copy: lines 20-437, the CIFAR-10 model, data loading, training and plots]

def multiclass_hinge_loss(logits: torch.Tensor, target: torch.Tensor, delta=1.):
    '''
        Args:
            logits: torch.Tensor with shape (B, C), where B is batch size, and C is number of classes.
            target: torch.LongTensor with shape (B, ) representing ground truth labels.
            delta: Hyperparameter.
        Returns:
            Loss as scalar torch.Tensor.
    '''
    target_oh = F.one_hot(target, 10)
    mask = target_oh > 0
    logits_correct_class = torch.masked_select(logits, mask)[:, None]
    zeros = torch.zeros(logits.shape).to(device)
    return torch.mean(torch.sum(torch.max(zeros, logits - logits_correct_class + torch.tensor(delta).to(device)[None, None]), dim=1))


