"""The NumPy framework's driver: forward and backward through a list of layers, SGD, training and evaluation.

A net is a plain list of layers (layers.py or fast_layers.py), input to logits, as train.py builds it; a
loss is a SoftmaxCrossEntropyWithLogits, or a RegularizedLoss wrapping one (train_l2reg.py).
"""
import numpy as np

import checkpoint
import metrics
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


def lr_at(lr_policy, epoch):
    """The learning rate of `epoch` (1-based): lr_policy {first epoch: lr} holds each rate until the next entry."""
    return lr_policy[max(start for start in lr_policy if start <= epoch)]


def train(net, loss, data, run, batch_size, lr_policy, shuffle=True, draw_every=100):
    """The lab's training loop: SGD on data['train_x'] (N, C, H, W) and data['train_y'] (N,).

    Every epoch visits the training images in a new random order, in mini-batches of batch_size, with the
    learning rate lr_at(lr_policy, epoch), then scores the net on the whole training and validation sets.
    conv1's filters are drawn every draw_every steps and after every epoch. `run` (run.Run) hands out the
    epochs and the steps still to do, and records, saves, resumes and stops the run.
    """
    train_x, train_y = data['train_x'], data['train_y']
    for epoch in run.epochs():
        lr = lr_at(lr_policy, epoch)
        order = run.rng.permutation(len(train_x)) if shuffle else np.arange(len(train_x))  # the lab's shuffle_data
        for step in run.steps():
            batch = order[step * batch_size:(step + 1) * batch_size]
            x, y = train_x[batch], one_hot(train_y[batch], net[-1].shape[1])  # the course's losses take one-hot
            logits = forward_pass(net, x)
            run.check_loss(loss.forward(logits, y))  # a NaN stops the run here, before it reaches the weights
            grads = backward_pass(net, loss, logits, y)
            sgd_update_params(grads, {'lr': lr})
            if run.step % draw_every == 0:
                draw_conv_filters(epoch, run.step, net[0], run.dir)
        run.end_epoch(lr=lr, train=evaluate(net, loss, train_x, train_y),
                      valid=evaluate(net, loss, data['valid_x'], data['valid_y']), reg_loss=regularization(loss))
        draw_conv_filters(epoch, run.step, net[0], run.dir)


EVAL_BATCH_SIZE = 500  # evaluation needs no gradients, and bigger batches only save a little time


def evaluate(net, loss, x, y, batch_size=EVAL_BATCH_SIZE):
    """The net on x (N, ...) with labels y (N,), forward passes only -> metrics.scores(): mean data loss,
    accuracy, confusion matrix, precision and recall. The data loss is the cross-entropy, without the L2 term
    of a RegularizedLoss (regularization() gives that)."""
    data_loss = getattr(loss, 'data_loss', loss)
    total_loss, predictions, num_classes = 0.0, [], net[-1].shape[1]
    for start in range(0, len(x), batch_size):
        logits = forward_pass(net, x[start:start + batch_size])
        labels = one_hot(y[start:start + batch_size], num_classes)
        total_loss += float(np.squeeze(data_loss.forward(logits, labels))) * len(logits)
        predictions.append(logits.argmax(axis=1))
    return metrics.scores(y, np.concatenate(predictions), total_loss / len(x), num_classes)


def one_hot(labels, num_classes):
    """Class indices (N,) -> one-hot rows (N, num_classes), as the course's losses take their labels."""
    return np.eye(num_classes)[labels]


def regularization(loss):
    """The L2 term of a RegularizedLoss (of any layers module: the course's API), 0 for a plain data loss."""
    return float(np.squeeze(sum(reg.forward() for reg in getattr(loss, 'regularizer_losses', []))))


def draw_conv_filters(epoch, step, layer, save_dir):
    """The course's function: a Convolution layer's filters as '<name>_epoch_EE_step_SSSSSS.png' in save_dir
    (plots.draw_conv_filters draws them)."""
    k = layer.kernel_size
    weights = layer.weights.reshape(layer.num_filters, layer.C, k, k)
    return plots.draw_conv_filters(epoch, step, weights, save_dir, prefix=layer.name)


# ----------------------------------------------------------------------------- weights on disk

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
    checkpoint.save_npz(path, parameters(net))


def load_params(net, path):
    """Copies parameters saved by save_params into the net, in place (regularizers keep their references)."""
    checkpoint.copy_arrays(parameters(net), checkpoint.load_npz(path), path)
