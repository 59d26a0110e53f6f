"""Task 2: train.py's net and training with L2 regularisation of the conv1, conv2 and fc3 weights.

    python train_l2reg.py                       # one model, lambda = --weight-decay (1e-3)
    python train_l2reg.py --sweep               # the lab's lambdas 1e-3, 1e-2, 1e-1, one model each
    python train_l2reg.py --sweep 0 1e-2 --limit 2000 --epochs 2   # a quick comparison
    python train_l2reg.py --resume runs/<run-name>   # go on: finished lambdas are kept, the stopped one continues

The loss is cross-entropy + (lambda / 2) * sum of the squared weights (not biases, not the logits layer).
A sweep trains every model from the same initial weights (same seed) into <run-dir>/wd_<lambda>/ and
compares them in sweep.json, sweep.md and sweep_filters.png (conv1's filters: the random init, then one
grid per lambda).
"""
import argparse
import os

import numpy as np

import checkpoint
import cli
import data
import layers
import nn
import plots
import train

SCRIPT = 'train_l2reg'
WEIGHT_DECAY = 1e-3
SWEEP = [1e-3, 1e-2, 1e-1]  # the lab's lambdas


def regularized_loss(net, weight_decay, layers=layers, layer_names=('conv1', 'conv2', 'fc3')):
    """Task 2's loss, from the classes of the module `layers`: cross-entropy + (weight_decay / 2) * ||w||^2 of
    the named layers' weights (not biases)."""
    regularizers = [layers.L2Regularizer(layer.weights, weight_decay, f'{layer.name}_l2reg')
                    for layer in net if layer.name in layer_names]
    return layers.RegularizedLoss(layers.SoftmaxCrossEntropyWithLogits(), regularizers)


def make_parser():
    parser = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_flags(parser, *cli.RUN_FLAGS, 'epochs', 'batch_size', 'lr_policy', 'dtype', 'limit', 'no_shuffle',
                  'valid_size', 'draw_every', 'layers', 'weight_decay', epochs=train.EPOCHS,
                  batch_size=train.BATCH_SIZE, lr_policy=train.LR_POLICY, valid_size=data.MNIST_VALID_SIZE,
                  weight_decay=WEIGHT_DECAY)
    parser.add_argument('--sweep', type=cli.non_negative_float, nargs='*', default=None,
                        help=f"train one model per lambda and compare them (no values: the lab's {SWEEP})")
    return parser


def sweep_lambdas(args):
    """The lambdas of --sweep (none given: the lab's), or None without --sweep; a lambda twice is a UserError."""
    if args.sweep is None:
        return None
    lambdas = args.sweep or SWEEP
    if len({f'{wd:g}' for wd in lambdas}) < len(lambdas):
        raise cli.UserError(f"--sweep lists a lambda twice: {' '.join(f'{wd:g}' for wd in lambdas)}")
    return lambdas


def conv1_filters(params):
    """conv1's weights (16, 25) from nn.parameters or an .npz -> (16, 1, 5, 5), for plots.filter_grid."""
    weights = params['conv1.weights']
    k = int(round(np.sqrt(weights.shape[1])))
    return weights.reshape(weights.shape[0], 1, k, k)


def describe_filters(filters, init):
    """How conv1's filters (F, C, k, k) look next to the random initial ones, in numbers and in a sentence:
    their size (mean |w|), their roughness (mean |difference| of neighbouring weights over mean |w|: noise is
    rough, smooth strokes are not) and the share of weights near zero (|w| < 0.02)."""
    def roughness(w):
        steps = np.concatenate([np.abs(np.diff(w, axis=2)).ravel(), np.abs(np.diff(w, axis=3)).ravel()])
        return float(steps.mean() / np.abs(w).mean())
    size, init_size = float(np.abs(filters).mean()), float(np.abs(init).mean())
    rough, init_rough = roughness(filters), roughness(init)
    near_zero = float((np.abs(filters) < 0.02).mean())
    looks = 'smoother than' if rough < 0.9 * init_rough else 'as rough as' if rough < 1.1 * init_rough else \
        'rougher than'
    sentence = (f"the weights are {size / init_size:.0%} of their initial size (mean |w| {size:.3f}); neighbouring "
                f"weights differ by {rough:.2f} of that size, {looks} the random init ({init_rough:.2f}); "
                f"{near_zero:.0%} of them are near zero (|w| < 0.02)")
    return {'conv1_mean_abs_weight': size, 'conv1_roughness': rough, 'conv1_near_zero': near_zero,
            'conv1_looks': sentence}


def sweep(args, run_dir, train_one):
    """One model per lambda of sweep_lambdas(args), each trained by train_one(args for it, its folder) ->
    (results, its parameters in nn.parameters' layout) from the same initial weights in <run_dir>/wd_<lambda>/;
    then the comparison: sweep.json, sweep.md (printed too) and sweep_filters.png. Returns the table's rows."""
    rows, filters = [], []
    for weight_decay in sweep_lambdas(args):
        sub_dir = cli.make_run_dir(run_dir, f'wd_{weight_decay:g}', SCRIPT, overwrite=True)
        print(f"--- lambda = {weight_decay:g} -> {sub_dir}")
        results, params = train_one(argparse.Namespace(**{**vars(args), 'weight_decay': weight_decay}), sub_dir)
        last = results['epochs'][-1]
        filters.append(conv1_filters(params))
        rows.append({'weight_decay': weight_decay, 'valid_acc': last['valid_acc'],
                     'test_acc': results['test']['accuracy'], 'train_loss': last['train_loss'],
                     'reg_loss': last['reg_loss'], 'run_dir': sub_dir})
    init_filters = conv1_filters(checkpoint.load_npz(os.path.join(rows[0]['run_dir'], 'init_weights.npz')))
    for row, row_filters in zip(rows, filters):
        row.update(describe_filters(row_filters, init_filters))
    lines = ['| lambda | valid acc | test acc | cross-entropy | L2 term | mean abs conv1 weight | roughness | near zero |',
             '|---:|---:|---:|---:|---:|---:|---:|---:|']
    lines += [f"| {r['weight_decay']:g} | {r['valid_acc']:.2%} | {r['test_acc']:.2%} | {r['train_loss']:.4f} | "
              f"{r['reg_loss']:.4f} | {r['conv1_mean_abs_weight']:.4f} | {r['conv1_roughness']:.2f} | "
              f"{r['conv1_near_zero']:.0%} |" for r in rows]
    init = describe_filters(init_filters, init_filters)
    lines += ['', f"Losses on the training set after the last epoch. The random initial conv1 weights have mean abs "
                  f"{init['conv1_mean_abs_weight']:.4f} and roughness {init['conv1_roughness']:.2f}; roughness is the "
                  f"mean |difference| of neighbouring weights over their mean |w|, near zero the share with |w| < 0.02."]
    lines += [''] + [f"- lambda = {r['weight_decay']:g}: {r['conv1_looks']}." for r in rows]
    print('\n'.join(lines))
    cli.write_text(os.path.join(run_dir, 'sweep.md'), '\n'.join(lines) + '\n')
    cli.write_json(os.path.join(run_dir, 'sweep.json'), {'rows': rows, 'table': '\n'.join(lines)})
    panels = [('random init', init_filters)] + [
        (f"lambda = {r['weight_decay']:g}\nmean |w| {r['conv1_mean_abs_weight']:.3f}, test {r['test_acc']:.2%}",
         row_filters) for r, row_filters in zip(rows, filters)]
    plots.save_filter_panels(os.path.join(run_dir, 'sweep_filters.png'), panels,
                             title='conv1 filters on one colour scale (mid grey = 0)')
    return rows


def main(argv=None):
    args = cli.parse_args(make_parser(), SCRIPT, argv)
    train.check_mnist_args(args)
    lambdas = sweep_lambdas(args)
    mnist = train.mnist_split(args)

    def train_one(run_args, sub_dir):
        results, net = train.train_model(run_args, mnist, sub_dir,
                                         lambda net, module: regularized_loss(net, run_args.weight_decay, module),
                                         title=f'NumPy framework, {run_args.layers} layers, lambda = '
                                               f'{run_args.weight_decay:g}')
        return results, nn.parameters(net)
    with cli.run_folder(args, SCRIPT, argv) as run_dir:
        if lambdas is None:
            train_one(args, run_dir)
        else:
            sweep(args, run_dir, train_one)


if __name__ == '__main__':
    cli.run(main)
