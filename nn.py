"""The NumPy framework's driver: forward and backward through a list of layers, SGD, training and evaluation.

A net is a plain list of layers (layers.py or fast_layers.py), input to logits, as train.py builds it; a
loss is a SoftmaxCrossEntropyWithLogits, or a RegularizedLoss wrapping one (train_l2reg.py).
"""
import checkpoint
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


def lr_at(lr_policy, epoch):
    """The learning rate of `epoch` (1-based): lr_policy {first epoch: lr} holds each rate until the next entry."""
    return lr_policy[max(start for start in lr_policy if start <= epoch)]


def train(net, loss, data, run, epochs, batch_size, lr_policy, draw_every=100):
    """The lab's training loop: SGD on data['train_x'] (N, C, H, W) and data['train_y'] (N,) for `epochs` epochs.

    Every epoch visits the training images in a new random order, in mini-batches of batch_size, with the
    learning rate lr_at(lr_policy, epoch), then measures loss and accuracy on the whole training and
    validation sets. conv1's filters are drawn every draw_every steps and after every epoch.
    `run` (checkpoint.Run) hands out the epochs and batches, and saves, resumes and stops the run.
    """
    train_x, train_y = data['train_x'], data['train_y']
    conv1 = net[0]
    batches = run.batches(len(train_x), batch_size)
    for epoch in run.epochs(epochs):
        lr = lr_at(lr_policy, epoch)
        for batch in batches:
            x, y = train_x[batch], train_y[batch]
            logits = forward_pass(net, x)
            run.check_loss(loss.forward(logits, y))  # a NaN stops the run here, before it reaches the weights
            grads = backward_pass(net, loss, logits, y)
            sgd_update_params(grads, {'lr': lr})
            if run.step % draw_every == 0:
                draw_conv_filters(epoch, run.step, conv1, run.dir)
        train_loss, train_acc = evaluate(net, loss, train_x, train_y)
        valid_loss, valid_acc = evaluate(net, loss, data['valid_x'], data['valid_y'])
        run.end_epoch(lr=lr, train_loss=train_loss, train_acc=train_acc, valid_loss=valid_loss,
                      valid_acc=valid_acc, reg_loss=regularization(loss))
        draw_conv_filters(epoch, run.step, conv1, run.dir)


def evaluate(net, loss, x, y, batch_size=500):
    """(mean data loss, accuracy) of the net on x (N, ...) and labels y (N,): forward passes only.

    The data loss is the cross-entropy, without the L2 term of a RegularizedLoss (regularization() gives that).
    """
    data_loss = getattr(loss, 'data_loss', loss)
    total_loss, correct = 0.0, 0
    for start in range(0, len(x), batch_size):
        logits = forward_pass(net, x[start:start + batch_size])
        labels = y[start:start + batch_size]
        total_loss += float(data_loss.forward(logits, labels)) * len(labels)
        correct += int((logits.argmax(axis=1) == labels).sum())
    return total_loss / len(x), correct / len(x)


def regularization(loss):
    """The L2 term of a RegularizedLoss, 0 for a plain data loss."""
    return float(loss.regularization()) if isinstance(loss, layers.RegularizedLoss) else 0.0


def draw_conv_filters(epoch, step, layer, save_dir):
    """Saves the filters of a Convolution layer as '<name>_epoch_EE_step_SSSSSS.png' in save_dir."""
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
