"""Task 1: the lab's conv-net on MNIST, trained with the hand-written NumPy framework.

    python train.py                    # the lab's run: 8 epochs of SGD, batch 50, lr 0.1 decaying 10x every 2 epochs
    python train.py --summary-only     # the model questions: shapes, parameters, receptive fields, memory, a sketch
    python train.py --limit 2000 --epochs 2   # a quick look
    python train.py --layers fast      # the same run with the fast twins of layers.py (fast_layers.py)
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
import metrics
import nn
import plots
import student
import summary
from run import Run

SCRIPT = 'train'
LAYERS = {'textbook': layers, 'fast': fast_layers}


def layers_module(choice):
    """--layers: layers.py ('textbook'), fast_layers.py ('fast'), or a student's layers.py (a path), loaded
    without running its top-level statements (student.py)."""
    return LAYERS[choice] if choice in LAYERS else student.load_layers(choice)

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


def make_parser():
    parser = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_flags(parser, *cli.RUN_FLAGS, 'epochs', 'batch_size', 'lr_policy', 'dtype', 'limit', 'no_shuffle',
                  'valid_size', 'draw_every', 'layers', epochs=EPOCHS, batch_size=BATCH_SIZE, lr_policy=LR_POLICY,
                  valid_size=data.MNIST_VALID_SIZE)
    parser.add_argument('--summary-only', action='store_true',
                        help='only answer the model questions (shapes, parameters, receptive fields, memory): '
                             'print them, write summary.json and the sketch net.png, and exit')
    return parser


SUMMARY_FLAGS = {'summary_only', 'batch_size', 'dtype', 'save_dir', 'run_name', 'overwrite'}  # what it reads


def parse_args(argv=None):
    parser = make_parser()
    args = cli.parse_args(parser, SCRIPT, argv)
    if args.summary_only:
        cli.refuse_flags(parser, argv, 'with --summary-only', SUMMARY_FLAGS)
    else:
        check_mnist_args(args)
    return args


def check_mnist_args(args):
    """What depends on MNIST's size (the published files') and on the machine's memory, checked before any work."""
    num_train = data.MNIST_TRAIN_SIZE + data.MNIST_VALID_SIZE - args.valid_size
    if num_train <= 0:
        raise cli.UserError(f"--valid-size {args.valid_size} leaves no MNIST training images")
    cli.check_batch_size(args.batch_size, min(args.limit or num_train, num_train),
                         "left by --limit" if args.limit else "of MNIST")
    # what the textbook layers keep per image (the most of any layers here): a training step needs it with the
    # gradients and temporaries, about three times; an evaluation batch once; and the data set itself
    rows = summary.model_summary(make_net(layers, 1, np.dtype(args.dtype).type), 1)
    per_image = summary.memory(rows)['kept_bytes'][args.dtype]
    images = data.MNIST_TRAIN_SIZE + data.MNIST_VALID_SIZE + 10_000
    cli.check_memory(f"--batch-size {args.batch_size}", max(3 * args.batch_size, nn.EVAL_BATCH_SIZE) * per_image
                     + images * 784 * np.dtype(args.dtype).itemsize)


def write_summary(args, run_dir, show=True):
    """Task 1's questions answered from the net's layers: summary.json and the sketch net.png in run_dir, and
    with `show` the table and the answers on stdout. The memory question is about the lab's im2col design,
    so the summary runs the textbook layers, with one line on what their fast twins keep instead."""
    dtype = np.dtype(args.dtype).type
    rows = summary.model_summary(make_net(layers, args.batch_size, dtype), args.batch_size)
    fast_rows = summary.model_summary(make_net(fast_layers, args.batch_size, dtype), args.batch_size)
    answers = summary.answers(rows, fast_rows)
    if show:
        print(f"The lab's net (layers.py, {args.dtype}) for a batch of {args.batch_size}:\n"
              f"{summary.format_summary(rows)}\n\n" + '\n'.join(answers.values()))
    cli.write_json(os.path.join(run_dir, 'summary.json'), {'layers': rows, 'memory': summary.memory(rows),
                                                           'fast_layers_memory': summary.memory(fast_rows),
                                                           'answers': answers})
    plots.draw_net(os.path.join(run_dir, 'net.png'), rows)


def mnist_split(args):
    """The lab's MNIST split in args.dtype, the training part cut to --limit images."""
    mnist = data.prepare_mnist(args.data_dir, np.dtype(args.dtype).type, valid_size=args.valid_size)
    mnist['train_x'], mnist['train_y'] = mnist['train_x'][:args.limit], mnist['train_y'][:args.limit]
    cli.check_batch_size(args.batch_size, len(mnist['train_x']), f"in {args.data_dir}")
    return mnist


def initial_loss(net, loss, mnist):
    """The loss before training, on the validation set, with what the lab asks about it; a dict for results.json."""
    valid = nn.evaluate(net, loss, mnist['valid_x'], mnist['valid_y'])
    reg_loss = nn.regularization(loss)
    answer = (f"Before training the validation loss is {valid['loss']:.4f} (accuracy {valid['accuracy']:.1%}), "
              f"close to ln C = ln 10 = {math.log(10):.4f}" + (f", plus {reg_loss:.4f} of L2" if reg_loss else "") +
              ": small random weights give small, nearly equal logits, so the softmax is about uniform (1/C per "
              "class) and the cross-entropy is -ln(1/C) = ln C.")
    print(answer)
    return {'initial_loss': valid['loss'], 'initial_reg_loss': reg_loss, 'initial_acc': valid['accuracy'],
            'answers': {'initial_loss': answer}}


def train_model(args, mnist, run_dir, make_loss=lambda net, module: module.SoftmaxCrossEntropyWithLogits(),
                title=None):
    """Builds the lab's net of --layers from args.seed and its loss (make_loss(net, layers module)), trains it
    with nn.train and tests it; writes everything into run_dir and returns (results, net). With --resume, a run
    that finished is read back and an unfinished one goes on from its checkpoint."""
    module = layers_module(args.layers)
    with student.blamed(module):  # a student's layers' mistake is one line naming its file and line
        return _train_model(args, mnist, run_dir, module, make_loss, title)


def _train_model(args, mnist, run_dir, module, make_loss, title):
    # NumPy's OpenBLAS on one thread: these products are small, and when anything else runs on the machine a
    # multi-threaded OpenBLAS's threads wait for each other, many times slower (README, "Speed"). The fast layers
    # split their own work between threads.
    fast_layers.set_blas_threads(1)
    np.random.seed(args.seed)
    net = make_net(module, args.batch_size, np.dtype(args.dtype).type)
    loss = make_loss(net, module)
    run = Run(run_dir, args.seed, args.resume is not None, args.epochs, len(mnist['train_x']), args.batch_size,
              arrays=nn.parameters(net), results={'script': f'{SCRIPT}.py', 'config': vars(args)})
    if run.finished:
        checkpoint.check_same_arrays(os.path.join(run_dir, 'weights.npz'), nn.parameters(net))
        print(f"{run_dir} finished already: test accuracy {run.results['test']['accuracy']:.2%}")
        return run.results, net
    source = f"{module.__name__}.py" if args.layers in LAYERS else student.layers_file(args.layers)
    print(f"{args.layers if args.layers in LAYERS else 'student'} layers ({source}), {args.dtype}")
    if not run.resumed:
        nn.save_params(net, os.path.join(run_dir, 'init_weights.npz'))
        nn.draw_conv_filters(0, 0, net[0], run_dir)
        run.results.update(initial_loss(net, loss, mnist))

    with np.errstate(over='ignore', invalid='ignore'):  # on the way to a NaN, run.check_loss says more
        nn.train(net, loss, mnist, run, args.batch_size, args.lr_policy, not args.no_shuffle, args.draw_every)

    test = nn.evaluate(net, loss, mnist['test_x'], mnist['test_y'])
    nn.save_params(net, os.path.join(run_dir, 'weights.npz'))
    plots.plot_training_progress(run_dir, plots.history(run.results['epochs']),
                                 title=title or f"NumPy framework, {args.layers} layers")
    run.finish(test=summary_of(test))
    print(f"test accuracy {test['accuracy']:.2%} (loss {test['loss']:.4f}); {run.results['seconds_per_epoch']:.1f} s "
          f"per epoch; results in {run_dir}")
    return run.results, net


def summary_of(scores):
    """evaluate()'s scores of MNIST as results.json keeps them (metrics.summary, the classes named by digit)."""
    return metrics.summary(scores, [str(digit) for digit in range(10)])


def main(argv=None):
    args = parse_args(argv)
    mnist = None if args.summary_only else mnist_split(args)
    with cli.run_folder(args, SCRIPT, argv) as run_dir:
        if args.summary_only:
            write_summary(args, run_dir)
            return
        if args.resume is None:
            write_summary(args, run_dir, show=False)
        train_model(args, mnist, run_dir)
        if not os.path.exists(os.path.join(run_dir, 'net.png')):  # a run killed before it had its summary
            write_summary(args, run_dir, show=False)


if __name__ == '__main__':
    cli.run(main)
