"""Task 1: the lab's conv-net on MNIST, trained with the hand-written NumPy framework.

    python train.py                    # the lab's run: 8 epochs of SGD, batch 50, lr 0.1 decaying 10x every 2 epochs
    python train.py --summary-only     # the model questions: shapes, parameters, receptive fields, memory, a sketch
    python train.py --limit 2000 --epochs 2   # a quick look
    python train.py --layers textbook  # the same run with layers.py instead of its fast twins (fast_layers.py)
    python train.py --resume runs/train-20261127-101500   # go on after Ctrl-C, a kill or a crash

Writes into <save-dir>/<run-name>/: config.json (the command line, for --resume), summary.json and net.png
(the model questions and a sketch of the net), conv1's filters as PNGs while it learns, training_plot.png,
init_weights.npz, weights.npz, results.json and checkpoint.npz (after every epoch, and at the step where
Ctrl-C or SIGTERM stopped it: what --resume continues from).
"""
import argparse
import math
import os

import numpy as np

import checkpoint
import cli
import data
import fast_layers
import layers
import nn
import plots
import summary

SCRIPT = 'train'
LAYERS = {'fast': fast_layers, 'textbook': layers}

# The lab's settings (the course's train.py): 8 epochs of plain SGD on mini-batches of 50, the learning
# rate divided by 10 every two epochs.
EPOCHS = 8
BATCH_SIZE = 50
LR_POLICY = '1:0.1,3:0.01,5:0.001,7:0.0001'


def make_net(layers, batch_size=BATCH_SIZE, dtype=np.float32):
    """The lab's net, the object `net` of the course's train.py: a list of layers, input to logits.

    conv1 16x5x5 SAME -> pool1 2x2 -> relu1 -> conv2 32x5x5 SAME -> pool2 2x2 -> relu2
    -> flatten3 -> fc3 512 -> relu3 -> logits 10;  (N, 1, 28, 28) -> (N, 10).
    `layers` is the module the layers come from: layers.py or its fast twins, fast_layers.py.
    Initial weights come from NumPy's global RNG (np.random.seed first).
    """
    inputs = np.zeros((batch_size, 1, 28, 28), dtype=dtype)  # only its shape and dtype are read
    net = [layers.Convolution(inputs, 16, 5, 'conv1')]
    net += [layers.MaxPooling(net[-1], 'pool1')]
    net += [layers.ReLU(net[-1], 'relu1')]
    net += [layers.Convolution(net[-1], 32, 5, 'conv2')]
    net += [layers.MaxPooling(net[-1], 'pool2')]
    net += [layers.ReLU(net[-1], 'relu2')]
    net += [layers.Flatten(net[-1], 'flatten3')]
    net += [layers.FC(net[-1], 512, 'fc3')]
    net += [layers.ReLU(net[-1], 'relu3')]
    net += [layers.FC(net[-1], 10, 'logits')]
    return net


def parse_lr_policy(text):
    """'1:0.1,3:0.01' -> {1: 0.1, 3: 0.01}: each learning rate holds from its epoch until the next entry."""
    policy = {}
    try:
        for item in text.split(','):
            epoch, lr = item.split(':')
            policy[int(epoch)] = float(lr)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not of the form 'epoch:lr,epoch:lr,...', e.g. {LR_POLICY}")
    if 1 not in policy:
        raise argparse.ArgumentTypeError(f"{text!r} must give a learning rate for epoch 1")
    if min(policy) < 1 or not all(lr > 0 and math.isfinite(lr) for lr in policy.values()):
        raise argparse.ArgumentTypeError(f"{text!r}: epochs must be >= 1 and learning rates positive")
    return dict(sorted(policy.items()))


def make_parser(description=__doc__):
    """The flags of the MNIST scripts: train.py's, which train_l2reg.py and train_pytorch.py extend."""
    parser = cli.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_common_args(parser, resume=True)
    parser.add_argument('--epochs', type=cli.positive_int, default=EPOCHS, help=f'(default: {EPOCHS})')
    parser.add_argument('--batch-size', type=cli.positive_int, default=BATCH_SIZE, help=f'(default: {BATCH_SIZE})')
    parser.add_argument('--lr-policy', type=parse_lr_policy, default=parse_lr_policy(LR_POLICY),
                        help=f"SGD learning rate per epoch as 'epoch:lr,...' (default: {LR_POLICY})")
    parser.add_argument('--dtype', choices=['float32', 'float64'], default='float32', help='(default: float32)')
    parser.add_argument('--limit', type=cli.positive_int, default=None,
                        help='train on the first N training images only (quick runs)')
    parser.add_argument('--no-shuffle', action='store_true',
                        help='fixed data order: the same batches in every epoch and in every framework')
    parser.add_argument('--valid-size', type=cli.positive_int, default=data.MNIST_VALID_SIZE,
                        help=f'the last N training images are held out for validation (default: {data.MNIST_VALID_SIZE})')
    parser.add_argument('--draw-every', type=cli.positive_int, default=100,
                        help='draw the conv1 filters every N steps, and after every epoch (default: 100)')
    parser.add_argument('--layers', choices=sorted(LAYERS), default='fast',
                        help='fast: fast_layers.py; textbook: layers.py, the same results, slower (default: fast)')
    parser.add_argument('--summary-only', action='store_true',
                        help='only answer the model questions (shapes, parameters, receptive fields, memory): '
                             'print them, write summary.json and the sketch net.png, and exit')
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


def write_summary(args, run_dir):
    """Task 1's questions answered from the net's layers: the table on stdout, summary.json and the sketch
    net.png in run_dir. The memory question is about the lab's im2col design, so the summary runs the
    textbook layers, with one line on what their fast twins keep instead."""
    dtype = np.dtype(args.dtype).type
    rows = summary.model_summary(make_net(layers, args.batch_size, dtype), args.batch_size)
    fast_rows = summary.model_summary(make_net(fast_layers, args.batch_size, dtype), args.batch_size)
    fast_kept = summary.memory(fast_rows)['kept_bytes']
    print(f"The lab's net (layers.py, {args.dtype}) for a batch of {args.batch_size}:\n{summary.format_summary(rows)}\n"
          f"  fast_layers.py keeps {summary.human_bytes(fast_kept['float32'])} in float32 "
          f"({summary.human_bytes(fast_kept['float64'])} in float64): its convolutions copy each input pixel once "
          f"per kernel column, not once per tap.")
    cli.write_json(os.path.join(run_dir, 'summary.json'), {'layers': rows, 'memory': summary.memory(rows),
                                                           'fast_layers_kept_bytes': fast_kept})
    plots.draw_net(os.path.join(run_dir, 'net.png'), rows)


def load_data(args):
    """The lab's MNIST split in args.dtype, the training part cut to --limit images."""
    mnist = data.prepare_mnist(args.data_dir, np.dtype(args.dtype).type, valid_size=args.valid_size)
    mnist['train_x'], mnist['train_y'] = mnist['train_x'][:args.limit], mnist['train_y'][:args.limit]
    if len(mnist['train_x']) < args.batch_size:
        raise cli.UserError(f"--batch-size {args.batch_size} is larger than the {len(mnist['train_x'])} "
                            f"training images in {args.data_dir}")
    return mnist


def initial_loss(net, loss, mnist):
    """The loss before training, on the validation set, with what the lab asks about it; a dict for results.json."""
    valid_loss, valid_acc = nn.evaluate(net, loss, mnist['valid_x'], mnist['valid_y'])
    reg_loss = nn.regularization(loss)
    print(f"initial validation loss {valid_loss:.4f} (accuracy {valid_acc:.1%}), ln(10) = {math.log(10):.4f}"
          + (f", plus {reg_loss:.4f} of L2" if reg_loss else "") + ":\n"
          "  small random weights give small, nearly equal logits, so the softmax is about uniform "
          "(1/10 per class) and the cross-entropy is -ln(1/10) = ln(10)")
    return {'initial_loss': valid_loss, 'initial_reg_loss': reg_loss, 'initial_acc': valid_acc}


def train_model(args, mnist, run_dir, make_loss=lambda net: layers.SoftmaxCrossEntropyWithLogits(), title='NumPy'):
    """Builds the lab's net from args.seed and its loss (make_loss(net)), trains it with nn.train and tests it;
    writes everything into run_dir and returns (results, net). With --resume, a run that finished is read
    back and an unfinished one goes on from its checkpoint."""
    np.random.seed(args.seed)
    net = make_net(LAYERS[args.layers], args.batch_size, np.dtype(args.dtype).type)
    loss = make_loss(net)
    run = checkpoint.Run(run_dir, args.seed, args.resume is not None, arrays=nn.parameters(net),
                         results={'config': vars(args)}, shuffle=not args.no_shuffle)
    if run.finished:
        print(f"{run_dir} finished already: test accuracy {run.results['test_acc']:.2%}")
        return run.results, net
    if not run.resumed:
        nn.save_params(net, os.path.join(run_dir, 'init_weights.npz'))
        nn.draw_conv_filters(0, 0, net[0], run_dir)
        run.results.update(initial_loss(net, loss, mnist))

    nn.train(net, loss, mnist, run, args.epochs, args.batch_size, args.lr_policy, args.draw_every)

    test_loss, test_acc = nn.evaluate(net, loss, mnist['test_x'], mnist['test_y'])
    nn.save_params(net, os.path.join(run_dir, 'weights.npz'))
    plots.plot_training_progress(run_dir, plots.history(run.results['epochs']), title=title)
    run.finish(test_loss=test_loss, test_acc=test_acc)
    print(f"test accuracy {test_acc:.2%} (loss {test_loss:.4f}); {run.results['seconds_per_epoch']:.1f} s per "
          f"epoch; results in {run_dir}")
    return run.results, net


def main(argv=None):
    args = cli.parse_args(make_parser(), SCRIPT, argv)
    check_args(args)
    mnist = None if args.summary_only else load_data(args)
    run_dir = cli.open_run_dir(args, SCRIPT, argv)
    if args.resume is None:  # a resumed run has it, and its folder must not change before its checkpoint is read
        write_summary(args, run_dir)
    if args.summary_only:
        return
    with cli.resume_hint(SCRIPT, run_dir):
        train_model(args, mnist, run_dir)


if __name__ == '__main__':
    cli.run(main)
