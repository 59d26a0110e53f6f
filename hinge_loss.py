"""Lab 2, bonus task: the lab's CIFAR-10 conv-net trained with the multiclass hinge loss instead of cross-entropy.

    python hinge_loss.py --data-dir data               # train with the hinge loss (train_cifar.py's model,
                                                       # data split, seed, schedule and evaluation)
    python hinge_loss.py --data-dir data --compare     # ... and with cross-entropy, then compare the two:
                                                       # compare.md, compare.json, compare.png
    python hinge_loss.py --data-dir data --compare-with runs/<train_cifar-run>   # compare with a finished
                                                       # train_cifar.py run of the same settings, not trained again
    python hinge_loss.py --data-dir data --tune 0.3 0.1 0.03 0.01 --limit 10000 --epochs 3   # both losses'
                                                       # learning rates, tuned the same way on the same budget
    python hinge_loss.py --resume runs/<run-name>      # go on after Ctrl-C or a kill: a finished loss is
                                                       # kept, the stopped one continues from its checkpoint

The training itself is train_cifar.py's (train_model, with this file's loss); this file defines the loss
and the comparison. With --compare the cross-entropy run uses train_cifar.py's learning rate.
The hinge model's scores are not probabilities: the figure of misclassified images shows their softmax
for display only, and says so.

Tuning: only the learning rate, of both losses alike (--tune): the hinge loss sums up to C-1 = 9 margin terms
per image, so its gradient is several times cross-entropy's, and its best rate is lower. delta stays 1:
with this unconstrained last layer a larger delta mostly rescales the scores.
"""
import argparse
import functools
import os

# Before torch starts its OpenMP threads: idle ones sleep instead of spinning. Spinning, they wait for each
# other whenever anything else runs on the machine, and a training step takes many times longer (README).
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')

import torch
import torch.nn.functional as F

import cli
import plots
import readback
import train_cifar
from run import Diverged

SCRIPT = 'hinge_loss'
HINGE_LR = 0.03  # the best of make lab-extended's tuning (--tune): its gradients are several times cross-entropy's
# What a cross-entropy run must share with the hinge run to be compared with it (--compare-with): all but lr.
SAME_SETTINGS = ('epochs', 'batch_size', 'gamma', 'weight_decay', 'padding', 'valid_size', 'limit', 'seed')


def multiclass_hinge_loss(logits: torch.Tensor, target: torch.Tensor, delta=1., reduction='mean'):
    """Multiclass hinge (SVM) loss, as in CS231n:

        L_i = sum_{j != y_i} max(0, s_j - s_{y_i} + delta),    loss = mean_i L_i

    Args:
        logits: (B, C) float scores s.
        target: (B,) int64 true classes y, each in 0..C-1.
        delta: the margin by which the true class's score should beat every other score.
        reduction: 'mean' -> scalar (the loss), 'none' -> (B,) per-example losses L_i.
    Returns:
        torch.Tensor: scalar, or (B,) with reduction='none'.
    Raises:
        ValueError on shapes that do not fit together or a class index outside 0..C-1.
    """
    if logits.ndim != 2 or target.shape != logits.shape[:1] or target.dtype != torch.int64:
        raise ValueError(f"expected logits (B, C) and int64 target (B,), got logits {tuple(logits.shape)} and "
                         f"target {tuple(target.shape)} of {target.dtype}")
    batch_size, num_classes = logits.shape
    if target.numel() and (target.min() < 0 or target.max() >= num_classes):
        raise ValueError(f"target holds classes {int(target.min())}..{int(target.max())}, outside 0..{num_classes - 1} "
                         f"of logits {tuple(logits.shape)} (target {tuple(target.shape)})")
    # masked_select returns a flat tensor in row-major order, so each row's entries stay together
    is_target = F.one_hot(target, num_classes).bool()
    correct = torch.masked_select(logits, is_target).view(batch_size, 1)  # (B, 1): s_{y_i}
    others = torch.masked_select(logits, ~is_target).view(batch_size, num_classes - 1)  # (B, C-1): s_j, j != y_i
    margins = others - correct + delta  # (B, C-1), the (B, 1) column broadcast over the row
    per_example = torch.max(margins, torch.zeros_like(margins)).sum(dim=1)  # (B,)
    if reduction == 'none':
        return per_example
    if reduction != 'mean':
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    return per_example.mean()


def comparison_table(results):
    """Markdown table of {run name: train_cifar results}: accuracies, epochs to best, speed, per-class recall."""
    class_names = list(next(iter(results.values()))['test']['recall'])
    header = ['run', 'lr', 'valid acc', 'test acc', 'epochs to best', 's/epoch'] + [
        f'recall {cli.markdown_text(n)}' for n in class_names]
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    for name, r in results.items():
        cells = [name, f"{r['config']['lr']:g}", f"{r['best_valid_acc']:.2%}", f"{r['test']['accuracy']:.2%}",
                 str(r['best_epoch']), f"{r['seconds_per_epoch']:.1f}"]
        cells += [f"{r['test']['recall'][c]:.1%}" for c in class_names]
        lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def make_parser():
    parser = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_flags(parser, *cli.RUN_FLAGS, 'device', 'epochs', 'batch_size', 'lr', 'gamma', 'weight_decay', 'padding',
                  'valid_size', 'limit', epochs=train_cifar.EPOCHS, batch_size=train_cifar.BATCH_SIZE, lr=HINGE_LR,
                  gamma=train_cifar.GAMMA, weight_decay=train_cifar.WEIGHT_DECAY, padding=train_cifar.PADDING,
                  valid_size=train_cifar.VALID_SIZE)
    parser.add_argument('--delta', type=cli.non_negative_float, default=1.0, help='the hinge margin (default: 1.0)')
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument('--compare', action='store_true',
                      help='also train with cross-entropy (same data, seed and schedule) and compare the two')
    mode.add_argument('--compare-with', metavar='RUN_DIR',
                      help='compare with the cross-entropy run in RUN_DIR, a finished train_cifar.py run of the '
                           'same settings (but its lr), instead of training one again')
    mode.add_argument('--tune', metavar='LR', type=cli.positive_float, nargs='+',
                      help='train both losses at each of these learning rates (on the budget --limit and --epochs '
                           'give) and report the best of each by validation accuracy')
    return parser


def parse_args(argv=None):
    parser = make_parser()
    args = cli.parse_args(parser, SCRIPT, argv)
    if args.tune:
        cli.refuse_flags(parser, argv, 'with --tune (it tries the learning rates it lists)', set(vars(args)) - {'lr'})
    train_cifar.check_cifar_args(args)
    return args


def cross_entropy_run(args):
    """The results of --compare-with's run, checked to be a finished train_cifar.py run of the same settings."""
    path = os.path.join(args.compare_with, 'results.json')
    results = readback.read_json(path, {'script': str, 'config': dict, 'finished': bool, 'epochs': list, 'test': dict})
    if results['script'] != 'train_cifar.py' or not results['finished']:
        raise cli.UserError(f"--compare-with {args.compare_with}: not a finished train_cifar.py run ({path})")
    differ = [key for key in SAME_SETTINGS if results['config'].get(key) != getattr(args, key)]
    if differ:
        raise cli.UserError(f"--compare-with {args.compare_with}: its --{differ[0].replace('_', '-')} "
                            f"{results['config'].get(differ[0])} differs from this run's {getattr(args, differ[0])}")
    return results


def main(argv=None):
    args = parse_args(argv)
    cross_entropy = cross_entropy_run(args) if args.compare_with else None  # refused before any work
    dataset = train_cifar.cifar10_tensors(args, cli.torch_device(args.device))
    hinge = functools.partial(multiclass_hinge_loss, delta=args.delta)
    with cli.run_folder(args, SCRIPT, argv) as run_dir:
        if args.tune:
            tune(args, dataset, run_dir, {'hinge': (hinge, 'Multiclass hinge loss'),
                                          'cross-entropy': (F.cross_entropy, 'Cross-entropy loss')})
            return
        sub_dir = cli.make_run_dir(run_dir, 'hinge', SCRIPT, overwrite=True)
        results = {'hinge': train_cifar.train_model(args, dataset, sub_dir, hinge, 'Multiclass hinge loss')}
        if args.compare:
            sub_dir = cli.make_run_dir(run_dir, 'cross-entropy', SCRIPT, overwrite=True)
            results['cross-entropy'] = train_cifar.train_model(
                argparse.Namespace(**{**vars(args), 'lr': train_cifar.LR}), dataset, sub_dir, F.cross_entropy,
                'Cross-entropy loss')
        if cross_entropy is not None:
            results['cross-entropy'] = cross_entropy
        if len(results) == 2:
            compare(run_dir, results, dataset['name'], args.delta)


def tune(args, dataset, run_dir, losses):
    """--tune: every loss of `losses` ({name: (loss_fn, loss_name)}) at every learning rate of args.tune, each
    into <run_dir>/<name>_lr<lr>/; tune.json and tune.md list each run's best validation accuracy (or that it
    diverged) and the best learning rate of each loss."""
    rows = []
    for name, (loss_fn, loss_name) in losses.items():
        for lr in args.tune:
            sub_dir = cli.make_run_dir(run_dir, f'{name}_lr{lr:g}', SCRIPT, overwrite=True)
            print(f"--- {name}, lr {lr:g} -> {sub_dir}")
            try:
                results = train_cifar.train_model(argparse.Namespace(**{**vars(args), 'lr': lr}), dataset, sub_dir,
                                                  loss_fn, loss_name)
                rows.append({'loss': name, 'lr': lr, 'best_valid_acc': results['best_valid_acc'],
                             'best_epoch': results['best_epoch'], 'diverged': None})
            except Diverged as error:  # a rate too high is a result of the tuning, not its failure
                print(f"diverged: {error}")
                rows.append({'loss': name, 'lr': lr, 'best_valid_acc': None, 'best_epoch': None,
                             'diverged': str(error).split(';')[0]})
    best = {name: max((row for row in rows if row['loss'] == name and row['diverged'] is None),
                      key=lambda row: row['best_valid_acc'], default={'lr': None})['lr'] for name in losses}
    lines = ['| loss | ' + ' | '.join(f'lr {lr:g}' for lr in args.tune) + ' | best lr |',
             '|---|' + '---:|' * (len(args.tune) + 1)]
    for name in losses:
        cells = [f"{row['best_valid_acc']:.2%}" if row['diverged'] is None else 'diverged'
                 for row in rows if row['loss'] == name]
        lines.append(f"| {name} | " + ' | '.join(cells) + f" | {best[name]} |")
    budget = {key: getattr(args, key) for key in ('limit', 'epochs', 'batch_size', 'gamma', 'seed')}
    note = (f"{dataset['name']}; best validation accuracy of each run, trained on {len(dataset['train_y'])} images "
            f"for {args.epochs} epoch(s) (batch {args.batch_size}, gamma {args.gamma:g}, seed {args.seed}).")
    print('\n'.join(lines) + f"\n\n{note}")
    cli.write_text(os.path.join(run_dir, 'tune.md'), '\n'.join(lines) + f"\n\n{note}\n")
    cli.write_json(os.path.join(run_dir, 'tune.json'), {'budget': budget, 'rows': rows, 'best_lr': best,
                                                       'table': '\n'.join(lines), 'note': note})


def compare(run_dir, results, data_name, delta):
    """compare.md (printed too), compare.json and compare.png of the hinge and the cross-entropy run."""
    table = comparison_table(results)
    note = (f"{data_name}; accuracies and test recalls of each run's best-validation model; "
            f"s/epoch is the training pass alone.")
    print(f"\n{table}\n\n{note}")
    cli.write_text(os.path.join(run_dir, 'compare.md'), f"# Hinge loss (delta {delta}) vs cross-entropy\n\n"
                                                         f"{table}\n\n{note}\n")
    cli.write_json(os.path.join(run_dir, 'compare.json'), {'table': table, 'note': note, 'runs': results})
    plots.plot_run_comparison(os.path.join(run_dir, 'compare.png'),
                              {name: plots.history(r['epochs']) for name, r in results.items()},
                              {name: r['loss'] for name, r in results.items()},
                              title=f"Hinge loss (delta {delta}) vs cross-entropy")
    print(f"wrote {run_dir}/compare.md, compare.json, compare.png")


if __name__ == '__main__':
    cli.run(main)
