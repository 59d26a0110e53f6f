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

import matplotlib.pyplot as plt
import numpy as np

import cli
import nn
import plots
import train

SCRIPT = 'train_l2reg'


def conv1_filters(params):
    """conv1's weights (16, 25) from nn.parameters / an .npz -> (16, 1, 5, 5) for plots.filter_grid."""
    weights = params['conv1.weights']
    k = int(round(np.sqrt(weights.shape[1])))
    return weights.reshape(weights.shape[0], 1, k, k)


def write_sweep(run_dir, rows, init_filters, filters):
    """The comparison of a sweep: a table on stdout, in sweep.json and in sweep.md; conv1's filters (init, then
    those of each row) side by side in sweep_filters.png."""
    cli.write_json(os.path.join(run_dir, 'sweep.json'), rows)
    lines = ['| lambda | valid acc | test acc | data loss | reg loss | mean abs conv1 weight |',
             '|---:|---:|---:|---:|---:|---:|']
    lines += [f"| {r['weight_decay']:g} | {r['valid_acc']:.2%} | {r['test_acc']:.2%} | {r['data_loss']:.4f} | "
              f"{r['reg_loss']:.4f} | {r['conv1_mean_abs_weight']:.4f} |" for r in rows]
    lines += ['', f"Losses are those on the training set after the last epoch; the random initial conv1 weights "
                  f"have mean abs {np.abs(init_filters).mean():.4f}."]
    with open(os.path.join(run_dir, 'sweep.md'), 'w') as f:
        f.write('\n'.join(lines) + '\n')
    print('\n'.join(lines))

    panels = [('random init', init_filters)] + [
        (f"lambda = {r['weight_decay']:g}\nmean |w| {r['conv1_mean_abs_weight']:.3f}, test {r['test_acc']:.2%}",
         row_filters) for r, row_filters in zip(rows, filters)]
    fig, axes = plt.subplots(1, len(panels), figsize=(3 * len(panels), 3.4))
    for ax, (title, filters) in zip(np.atleast_1d(axes), panels):
        ax.imshow(plots.filter_grid(filters, cols=4), cmap='gray', interpolation='nearest')
        ax.set_title(title, fontsize=9)
        ax.axis('off')
    fig.suptitle('conv1 filters (each grid scaled to its own min..max)')
    fig.tight_layout(rect=(0, 0, 1, 0.9))  # leave room for the suptitle
    fig.savefig(os.path.join(run_dir, 'sweep_filters.png'), dpi=100)
    plt.close(fig)


def sweep(args, mnist, run_dir, weight_decays):
    """One model per lambda, each from the same initial weights, then write_sweep; returns the table rows."""
    rows, filters = [], []
    resume = args.resume is not None
    for weight_decay in weight_decays:
        sub_dir = cli.make_run_dir(run_dir, f'wd_{weight_decay:g}', SCRIPT, args.overwrite or resume)
        print(f"--- lambda = {weight_decay:g} -> {sub_dir}")
        run_args = argparse.Namespace(**{**vars(args), 'weight_decay': weight_decay, 'sweep': None})
        results, net = train.train_model(run_args, mnist, sub_dir, weight_decay, resume)
        last = results['epochs'][-1]
        filters.append(conv1_filters(nn.parameters(net)))
        rows.append({'weight_decay': weight_decay, 'valid_acc': last['valid_acc'], 'test_acc': results['test_acc'],
                     'data_loss': last['data_loss'], 'reg_loss': last['reg_loss'],
                     'conv1_mean_abs_weight': float(np.abs(filters[-1]).mean()), 'run_dir': sub_dir})
    with np.load(os.path.join(rows[0]['run_dir'], 'init_weights.npz')) as init:  # the same for every lambda
        init_filters = conv1_filters(init)
    write_sweep(run_dir, rows, init_filters, filters)
    return rows


def main(argv=None):
    args = cli.parse_args(train.make_parser(__doc__, weight_decay=1e-3), SCRIPT, argv)
    train.check_args(args)
    weight_decays = None if args.sweep is None else (args.sweep or cli.LAB_SWEEP)
    if weight_decays is not None and len({f'{wd:g}' for wd in weight_decays}) < len(weight_decays):
        raise cli.UserError(f"--sweep lists a lambda twice: {' '.join(f'{wd:g}' for wd in weight_decays)}")
    if args.summary_only:
        train.print_summary(args)
        return
    mnist = train.load_data(args)
    run_dir = cli.open_run_dir(args, SCRIPT, argv)
    train.print_summary(args)
    with cli.resume_hint(SCRIPT, run_dir):
        if weight_decays is None:
            train.train_model(args, mnist, run_dir, args.weight_decay, resume=args.resume is not None)
        else:
            sweep(args, mnist, run_dir, weight_decays)


if __name__ == '__main__':
    cli.run(main)
