"""Task 1: the lab's conv-net on MNIST, trained with the hand-written NumPy framework.

    python train.py                    # the lab's run: 8 epochs of SGD, batch 50, lr 0.1 decaying 10x every 2 epochs
    python train.py --summary-only     # the model questions: shapes, parameters, receptive fields, memory
    python train.py --limit 2000 --epochs 2   # a quick look
    python train.py --resume runs/train-20261127-101500   # go on after Ctrl-C, a kill or a crash

Writes into <save-dir>/<run-name>/: config.json (the command line, for --resume), conv1's filters as PNGs
while it learns, training_plot.png, init_weights.npz, weights.npz, results.json and checkpoint.npz
(after every epoch, and at the step where Ctrl-C or SIGTERM stopped it: what --resume continues from).
"""
import argparse
import math
import os

import numpy as np

import checkpoint
import cli
import data
import nn

SCRIPT = 'train'


def make_parser(description=__doc__, weight_decay=None):
    """train.py's flags; train_l2reg.py adds --weight-decay and --sweep through `weight_decay`."""
    parser = cli.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_common_args(parser, resume=True)
    cli.add_mnist_training_args(parser, weight_decay=weight_decay)
    parser.add_argument('--draw-every', type=cli.positive_int, default=100,
                        help='draw the conv1 filters every N steps, and after every epoch (default: 100)')
    parser.add_argument('--summary-only', action='store_true',
                        help='print the model summary (shapes, parameters, receptive fields, memory) and exit')
    return parser


def check_args(args):
    """What argparse cannot check alone, before any work."""
    num_train = data.MNIST_TRAIN_SIZE + data.MNIST_VALID_SIZE - args.valid_size  # of the published files
    if num_train <= 0:
        raise cli.UserError(f"--valid-size {args.valid_size} leaves no MNIST training images")
    num_train = min(args.limit or num_train, num_train)
    if args.batch_size > num_train:
        raise cli.UserError(f"--batch-size {args.batch_size} is larger than the {num_train} training images"
                            + (" left by --limit" if args.limit else ""))


def print_summary(args):
    net, _ = nn.lab_mnist_net(args.batch_size, np.dtype(args.dtype).type)
    print(f"The lab's net for a batch of {args.batch_size}; 'kept' is the memory backprop needs "
          f"(what each layer's forward stores for its backward):")
    print(nn.format_summary(nn.model_summary(net, args.batch_size), net[0].input_shape))


def load_data(args):
    """The lab's MNIST split in args.dtype, the training part cut to --limit images."""
    mnist = data.prepare_mnist(args.data_dir, np.dtype(args.dtype).type, valid_size=args.valid_size)
    mnist['train_x'], mnist['train_y'] = mnist['train_x'][:args.limit], mnist['train_y'][:args.limit]
    return mnist


def train_model(args, mnist, run_dir, weight_decay=None, resume=False):
    """Builds the lab's net from args.seed (L2-regularised if weight_decay is not None), trains it with
    nn.train and tests it; writes everything into run_dir and returns (results, net).
    With resume=True, a run that finished in run_dir is read back, an unfinished one continued."""
    cli.seed_everything(args.seed)
    net, loss = nn.lab_mnist_net(args.batch_size, np.dtype(args.dtype).type)
    if weight_decay is not None:
        loss = nn.l2_regularized(net, loss, weight_decay)
    finished = resume and checkpoint.finished_results(run_dir, 'test_acc')
    if finished:
        nn.load_params(net, os.path.join(run_dir, 'weights.npz'))
        print(f"{run_dir} finished already: test accuracy {finished['test_acc']:.2%}")
        return finished, net

    results = {}
    if not (resume and os.path.exists(os.path.join(run_dir, checkpoint.NPZ))):
        valid_data_loss, valid_acc = nn.evaluate(net, loss, mnist['valid_x'], mnist['valid_y'])
        results = {'config': vars(args), 'initial_loss': valid_data_loss + nn.regularization(loss), 'epochs': []}
        print(f"initial validation loss {valid_data_loss:.4f} (accuracy {valid_acc:.1%}), ln(10) = {math.log(10):.4f}"
              + (f", plus {nn.regularization(loss):.4f} regularisation" if weight_decay else "") + ":\n"
              "  small random weights give small, nearly equal logits, so the softmax is about uniform "
              "(1/10 per class) and the cross-entropy is -ln(1/10) = ln(10)")

    title = 'NumPy' + (f', lambda = {weight_decay:g}' if weight_decay is not None else '')
    nn.train(net, loss, mnist, run_dir, results, epochs=args.epochs, batch_size=args.batch_size,
             lr_policy=args.lr_policy, shuffle=not args.no_shuffle, seed=args.seed, draw_every=args.draw_every,
             title=title, resume=resume)

    test_data_loss, test_acc = nn.evaluate(net, loss, mnist['test_x'], mnist['test_y'])
    epoch_seconds = [record['seconds'] for record in results['epochs']]
    images_per_epoch = len(mnist['train_x']) // args.batch_size * args.batch_size  # nn.train drops a partial batch
    results.update(test_loss=test_data_loss + nn.regularization(loss), test_acc=test_acc,
                   seconds_per_epoch=float(np.mean(epoch_seconds)),
                   images_per_second=len(epoch_seconds) * images_per_epoch / sum(epoch_seconds))
    cli.write_json(os.path.join(run_dir, 'results.json'), results)
    print(f"test accuracy {test_acc:.2%} (loss {results['test_loss']:.4f}); "
          f"{results['seconds_per_epoch']:.1f} s per epoch; results in {run_dir}")
    return results, net


def main(argv=None):
    args = cli.parse_args(make_parser(), SCRIPT, argv)
    check_args(args)
    if args.summary_only:
        print_summary(args)
        return
    mnist = load_data(args)
    run_dir = cli.open_run_dir(args, SCRIPT, argv)
    print_summary(args)
    with cli.resume_hint(SCRIPT, run_dir):
        train_model(args, mnist, run_dir, resume=args.resume is not None)


if __name__ == '__main__':
    cli.run(main)
