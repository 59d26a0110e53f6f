"""The NumPy framework's driver: forward and backward through a list of layers, SGD, and weights on disk.

A net is a plain list of layers from layers.py, input to logits; a loss is a
SoftmaxCrossEntropyWithLogits or a RegularizedLoss wrapping one.
"""
import json
import os
import time

import numpy as np
from tqdm import tqdm

import checkpoint
import cli
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
    checkpoint.save_npz(path, parameters(net))


def load_params(net, path):
    """Copies parameters saved by save_params into the net, in place (regularizers keep their references)."""
    with np.load(path, allow_pickle=False) as saved:
        copy_params(net, saved, path)


def copy_params(net, saved, source):
    """Copies the arrays of `saved` ({'<layer>.weights': ...}) into the net's parameters, in place."""
    for key, param in parameters(net).items():
        if key not in saved:
            raise ValueError(f"{source}: missing parameter {key!r}")
        if saved[key].shape != param.shape:
            raise ValueError(f"{source}: {key!r} has shape {saved[key].shape}, the net needs {param.shape}")
        param[...] = saved[key]


# ----------------------------------------------------------------------------- training and evaluation

class Diverged(cli.UserError):
    """The loss became NaN or infinite."""


def evaluate(net, loss, x, y, batch_size=500):
    """(mean data loss, accuracy) of the net on x (N, ...), y (N,), forward only, in batches of `batch_size`.

    The data loss is the cross-entropy without any regularisation (loss.regularization() adds that).
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
    """The regularisation part of the loss (0 for a plain data loss)."""
    return float(loss.regularization()) if hasattr(loss, 'regularization') else 0.0


def train(net, loss, data, run_dir, results, epochs, batch_size, lr_policy, shuffle=True, seed=0, draw_every=100,
          title=None, resume=False):
    """The training loop of train.py and train_l2reg.py: SGD on data['train_x'], data['train_y'].

    data: dict with train_x, train_y, valid_x, valid_y (as data.prepare_mnist returns).
    lr_policy: {first epoch: lr} (cli.parse_lr_policy). Each epoch visits the training images in one random
    permutation (seeded; the same order every epoch with shuffle=False) and drops the last partial batch.
    After every epoch it measures loss and accuracy on the whole training and validation sets (the
    reported losses are the regularised objective; 'data_loss' and 'reg_loss' split the training one),
    appends that record to results['epochs'] and writes into run_dir: init_weights.npz (before the first
    update), weights.npz and results.json (after every epoch), conv1's filters (at step 0, every
    `draw_every` steps and after every epoch) and, at the end, training_plot.png.
    A NaN or infinite loss raises Diverged before the update it would cause; weights.npz then holds the
    weights of the last finished epoch (init_weights.npz, if none finished).

    Before the first epoch, after every epoch, and when Ctrl-C or SIGTERM stops it between two steps, it
    also writes checkpoint.npz (see checkpoint.py): the weights, where the run stands (epoch, step), the
    shuffling RNG's state at the start of the epoch and `results`. With resume=True and a checkpoint.npz
    in run_dir it goes on from there instead (replacing the net's weights and what `results` holds):
    the interrupted epoch gets the same permutation and skips the batches done, so the run ends bit for
    bit where an uninterrupted one would.
    """
    train_x, train_y = data['train_x'], data['train_y']
    steps_per_epoch = len(train_x) // batch_size
    if steps_per_epoch == 0:
        raise cli.UserError(f"batch size {batch_size} is larger than the {len(train_x)} training images")
    conv1 = next(layer for layer in net if isinstance(layer, layers.Convolution))
    data_loss = getattr(loss, 'data_loss', loss)
    rng = np.random.default_rng(seed)
    checkpoint_path = os.path.join(run_dir, checkpoint.NPZ)

    def save_checkpoint(epochs_done, batches_done=0, epoch_rng=None, epoch_seconds=0.0, running_loss=0.0):
        """epoch_rng: the RNG's state at the start of epoch epochs_done + 1 (default: now)."""
        checkpoint.save_npz(checkpoint_path, {
            **parameters(net), 'epoch': epochs_done, 'batches_done': batches_done, 'step': step,
            'rng': checkpoint.pcg64_state(rng) if epoch_rng is None else epoch_rng,
            'epoch_seconds': epoch_seconds, 'running_loss': running_loss,
            'results': checkpoint.results_text(results)})

    # NumPy's overflow warnings on the way to a NaN say less than the checks below.
    with np.errstate(over='ignore', invalid='ignore'), cli.stop_between_steps():
        if resume and os.path.exists(checkpoint_path):
            saved = checkpoint.load_npz(checkpoint_path)
            copy_params(net, saved, checkpoint_path)
            checkpoint.set_pcg64_state(rng, saved['rng'])
            results.clear()
            results.update(json.loads(str(saved['results'])))
            done, step, first_batch = int(saved['epoch']), int(saved['step']), int(saved['batches_done'])
            seconds_before, running_loss = float(saved['epoch_seconds']), float(saved['running_loss'])
            print(checkpoint.resuming(run_dir, done, epochs, first_batch, steps_per_epoch))
        else:
            done, step, first_batch, seconds_before, running_loss = 0, 0, 0, 0.0, 0.0
            save_params(net, os.path.join(run_dir, 'init_weights.npz'))
            draw_conv_filters(0, 0, conv1, run_dir)
            save_checkpoint(0)
        last_good = 'weights.npz' if done else 'init_weights.npz'
        for epoch in range(done + 1, epochs + 1):
            lr = cli.lr_at(lr_policy, epoch)
            epoch_rng = checkpoint.pcg64_state(rng)
            order = rng.permutation(len(train_x)) if shuffle else np.arange(len(train_x))
            start_time = time.perf_counter() - seconds_before
            progress = tqdm(range(first_batch, steps_per_epoch), initial=first_batch, total=steps_per_epoch,
                            desc=f'epoch {epoch}/{epochs} lr {lr:g}', leave=False)
            for i in checkpoint.steps(progress, epoch, lambda steps_done: save_checkpoint(
                    epoch - 1, steps_done, epoch_rng, time.perf_counter() - start_time, running_loss)):
                batch = order[i * batch_size:(i + 1) * batch_size]
                x, y = train_x[batch], train_y[batch]
                logits = forward_pass(net, x)
                batch_loss = float(data_loss.forward(logits, y)) + regularization(loss)
                if not np.isfinite(batch_loss):
                    raise Diverged(f"the loss became {batch_loss} at epoch {epoch}, step {i + 1} of "
                                   f"{steps_per_epoch} (lr {lr:g}); the last good weights are in "
                                   f"{os.path.join(run_dir, last_good)}")
                sgd_update_params(backward_pass(net, loss, logits, y), {'lr': lr})
                step += 1
                running_loss += (batch_loss - running_loss) / (i + 1)
                progress.set_postfix(loss=f'{running_loss:.4f}', refresh=False)
                if step % draw_every == 0:
                    draw_conv_filters(epoch, step, conv1, run_dir)
            seconds = time.perf_counter() - start_time
            first_batch, seconds_before, running_loss = 0, 0.0, 0.0
            progress.close()
            draw_conv_filters(epoch, step, conv1, run_dir)

            penalty = regularization(loss)
            train_data_loss, train_acc = evaluate(net, loss, train_x, train_y)
            valid_data_loss, valid_acc = evaluate(net, loss, data['valid_x'], data['valid_y'])
            if not np.isfinite(train_data_loss + penalty):  # the epoch's last update broke the weights
                raise Diverged(f"the loss became {train_data_loss + penalty} after the last step of epoch {epoch} "
                               f"(lr {lr:g}); the last good weights are in {os.path.join(run_dir, last_good)}")
            save_params(net, os.path.join(run_dir, 'weights.npz'))
            last_good = 'weights.npz'
            record = {'epoch': epoch, 'lr': lr, 'train_loss': train_data_loss + penalty, 'train_acc': train_acc,
                      'valid_loss': valid_data_loss + penalty, 'valid_acc': valid_acc,
                      'data_loss': train_data_loss, 'reg_loss': penalty,
                      'seconds': seconds, 'images_per_second': steps_per_epoch * batch_size / seconds}
            results['epochs'].append(record)
            print(f"epoch {epoch}: train loss {record['train_loss']:.4f} acc {train_acc:.2%}, "
                  f"valid loss {record['valid_loss']:.4f} acc {valid_acc:.2%}, "
                  f"{seconds:.1f} s ({record['images_per_second']:.0f} img/s)")
            cli.write_json(os.path.join(run_dir, 'results.json'), results)
            save_checkpoint(epoch)
    history = {key: [record[key] for record in results['epochs']]
               for key in ('train_loss', 'valid_loss', 'train_acc', 'valid_acc', 'lr')}
    plots.plot_training_progress(os.path.join(run_dir, 'training_plot.png'), history, title=title)
    return results


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


# ----------------------------------------------------------------------------- the model questions of task 1

def model_summary(net, batch_size=50):
    """Answers task 1's questions from the layers themselves: one dict per layer, then one for the loss.

    shape:   the layer's output shape for a batch of `batch_size`
    params:  number of weights and biases
    rf:      receptive field of one output unit in input pixels, per side (None: the whole input).
             Propagated from the input: a k x k window over units `jump` pixels apart adds
             (k - 1) * jump pixels, and a stride multiplies jump. Units at the border see part of it as padding.
    kept:    what the layer's forward keeps for backward, e.g. 'x_cols float32 (25, 25, 1568)' (conv1's
             im2col columns, in blocks of 2 images); found by running one forward pass of zeros,
             so it is what the code stores, not what a textbook says
    bytes:   {'float32': ..., 'float64': ...}: memory of what is kept if the net ran in that dtype
             (float arrays scale with the dtype; masks and indices do not)
    """
    x = np.zeros((batch_size,) + tuple(net[0].input_shape[1:]), dtype=net[0].dtype)
    rows, rf, jump = [], 1, 1
    for layer in net:
        x = layer.forward(x)
        kept = {name: value for name, value in vars(layer).items()
                if isinstance(value, np.ndarray) and name not in ('weights', 'bias')}
        if isinstance(layer, layers.Convolution):
            rf, jump = rf + (layer.kernel_size - 1) * jump, jump * layer.stride
        elif isinstance(layer, layers.MaxPooling):
            rf, jump = rf + (layer.pool_size - 1) * jump, jump * layer.stride
        elif isinstance(layer, layers.FC):
            rf = None  # every output sees every input
        rows.append({'name': layer.name, 'shape': x.shape,
                     'params': layer.weights.size + layer.bias.size if layer.has_params else 0, 'rf': rf,
                     'kept': ', '.join(f'{name} {value.dtype} {value.shape}' for name, value in kept.items()) or '-',
                     'bytes': _bytes_by_dtype(kept.values())})
    # The loss's backward recomputes the softmax from the logits, which the training loop holds until then.
    rows.append({'name': 'loss', 'shape': (), 'params': 0, 'rf': None,
                 'kept': f'logits {x.dtype} {x.shape}', 'bytes': _bytes_by_dtype([x])})
    return rows


def _bytes_by_dtype(arrays):
    return {dtype: sum(a.size * (np.dtype(dtype).itemsize if a.dtype.kind == 'f' else a.itemsize) for a in arrays)
            for dtype in ('float32', 'float64')}


def _human_bytes(num_bytes):
    for unit in ('B', 'kB', 'MB'):
        if num_bytes < 1000 or unit == 'MB':
            return f'{num_bytes:.0f} {unit}' if unit == 'B' else f'{num_bytes:.1f} {unit}'
        num_bytes /= 1000


def format_summary(rows, input_shape):
    """model_summary's rows as a text table with totals; input_shape (N, C, H, W) names the full field."""
    lines = [f"{'layer':9} {'output shape':17} {'params':>8} {'receptive field':>15} "
             f"{'kept: float32':>13} {'float64':>9}  what backward needs"]
    for row in rows:
        rf = '' if row['name'] == 'loss' else \
            f"all {input_shape[-2]}x{input_shape[-1]}" if row['rf'] is None else f"{row['rf']}x{row['rf']}"
        lines.append(f"{row['name']:9} {str(row['shape']):17} {row['params']:>8,} {rf:>15} "
                     f"{_human_bytes(row['bytes']['float32']):>13} {_human_bytes(row['bytes']['float64']):>9}  "
                     f"{row['kept']}")
    totals = {dtype: sum(row['bytes'][dtype] for row in rows) for dtype in ('float32', 'float64')}
    lines.append(f"{'total':9} {'':17} {sum(row['params'] for row in rows):>8,} {'':>15} "
                 f"{_human_bytes(totals['float32']):>13} {_human_bytes(totals['float64']):>9}")
    return '\n'.join(lines)
