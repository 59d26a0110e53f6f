"""The NumPy framework's driver: forward and backward through a list of layers, SGD, and weights on disk.

A net is a plain list of layers from layers.py, input to logits; a loss is a
SoftmaxCrossEntropyWithLogits or a RegularizedLoss wrapping one.
"""
import os

import numpy as np

import layers
import plots


def forward_pass(net, inputs):
    """Runs the layers in order: (N, ...) -> logits (N, num_classes)."""
    output = inputs
    for layer in net:
        output = layer.forward(output)
    return output


def backward_pass(net, loss, x, y):
    """Backprop from the loss through every layer; x are the logits the loss saw.

    Returns the course's gradient list: one [[w, dw], [b, db], name] per layer with
    parameters, and one [[w, dw], name] per regularizer of a RegularizedLoss.
    The first layer's input gradient is never used, so it is not computed.
    """
    grads = []
    grad_out = loss.backward_inputs(x, y)
    if loss.has_params:
        grads += loss.backward_params()
    for depth, layer in reversed(list(enumerate(net))):
        if layer.has_params:
            grads.append(layer.backward_params(grad_out))
        if depth > 0:
            grad_out = layer.backward_inputs(grad_out)
    return grads


def sgd_update_params(grads, config):
    """Plain SGD in place: w -= lr * dw for every [w, dw] pair in `grads` (config['lr'])."""
    lr = config['lr']
    for layer_grads in grads:
        for param, grad in layer_grads[:-1]:
            param -= lr * grad


def draw_conv_filters(epoch, step, layer, save_dir):
    """Saves the filters of a Convolution layer as '<name>_epoch_EE_step_SSSSSS.png' in save_dir."""
    k = layer.kernel_size
    weights = layer.weights.reshape(layer.num_filters, layer.C, k, k)
    path = os.path.join(save_dir, '%s_epoch_%02d_step_%06d.png' % (layer.name, epoch, step))
    plots.save_filter_grid(path, weights)
    return path


def parameters(net):
    """{'<layer>.weights': array, '<layer>.bias': array} for every layer with parameters, in net order."""
    params = {}
    for layer in net:
        if layer.has_params:
            params[f'{layer.name}.weights'] = layer.weights
            params[f'{layer.name}.bias'] = layer.bias
    return params


def save_params(net, path):
    """Writes the net's parameters to an .npz (keys as in parameters()), atomically."""
    tmp_path = path + '.tmp.npz'
    np.savez(tmp_path, **parameters(net))
    os.replace(tmp_path, path)


def load_params(net, path):
    """Copies parameters saved by save_params into the net, in place (regularizers keep their references)."""
    with np.load(path, allow_pickle=False) as saved:
        for key, param in parameters(net).items():
            if key not in saved:
                raise ValueError(f"{path}: missing parameter {key!r}")
            if saved[key].shape != param.shape:
                raise ValueError(f"{path}: {key!r} has shape {saved[key].shape}, the net needs {param.shape}")
            param[...] = saved[key]


def lab_mnist_net(batch_size=50, dtype=np.float32):
    """The lab's MNIST net (tasks 1-3) and its loss:

    conv1 16x5x5 SAME -> pool1 2x2 -> relu1 -> conv2 32x5x5 SAME -> pool2 2x2 -> relu2
    -> flatten3 -> fc3 512 -> relu3 -> logits 10, softmax cross-entropy.
    Initial weights come from NumPy's global RNG (seed it first).
    """
    example_input = np.zeros((batch_size, 1, 28, 28), dtype=dtype)
    net = [layers.Convolution(example_input, 16, 5, 'conv1')]
    net += [layers.MaxPooling(net[-1], 'pool1')]
    net += [layers.ReLU(net[-1], 'relu1')]
    net += [layers.Convolution(net[-1], 32, 5, 'conv2')]
    net += [layers.MaxPooling(net[-1], 'pool2')]
    net += [layers.ReLU(net[-1], 'relu2')]
    net += [layers.Flatten(net[-1], 'flatten3')]
    net += [layers.FC(net[-1], 512, 'fc3')]
    net += [layers.ReLU(net[-1], 'relu3')]
    net += [layers.FC(net[-1], 10, 'logits')]
    return net, layers.SoftmaxCrossEntropyWithLogits()


def l2_regularized(net, data_loss, weight_decay, layer_names=('conv1', 'conv2', 'fc3')):
    """Task 2's loss: data_loss + (weight_decay/2) * ||w||^2 over the weights (not biases) of the named layers."""
    regularizers = [layers.L2Regularizer(layer.weights, weight_decay, f'{layer.name}_l2reg')
                    for layer in net if layer.name in layer_names]
    return layers.RegularizedLoss(data_loss, regularizers)
