"""Lab 2, task 4: the lab's convolutional model on CIFAR-10, in PyTorch.

    python train_cifar.py --data-dir data              # the lab's run: 8 epochs, ~70% validation accuracy
    python train_cifar.py --data-dir data --weight-decay 1e-4   # the lambda of the lab's filter figure
    python train_cifar.py --resume runs/<run-name>     # go on after Ctrl-C or a kill

Model (the lab's):  conv(16,5) -> relu -> pool(3,2) -> conv(32,5) -> relu -> pool(3,2)
                    -> fc(256) -> relu -> fc(128) -> relu -> fc(10)
Shapes per image, with --padding 2 (the default) and 0:
    padding 2:  3x32x32 -> conv1 16x32x32 -> pool 16x15x15 -> conv2 32x15x15 -> pool 32x7x7 -> 1568 -> 256 -> 128 -> 10
    padding 0:  3x32x32 -> conv1 16x28x28 -> pool 16x13x13 -> conv2 32x9x9   -> pool 32x4x4 -> 512  -> 256 -> 128 -> 10
(3x3/2 max-pools floor, PyTorch's default: n pixels -> (n - 3) // 2 + 1.)

Settings the lab leaves open, chosen here (README.md compares them with the alternatives):
    --padding 2       the lab does not say; 2 keeps 32x32 maps, so conv2 and the classifier see more of each image
    --lr 0.1          the lab gives none; with --gamma 0.7 (ExponentialLR, which the lab suggests) it decays
                      to 0.008 in epoch 8
    --weight-decay    1e-3 on every layer's weights, the logits layer's too (tasks 2 and 3 leave that one
                      out), not on the biases; chosen from 0, 1e-4, 1e-3 and 1e-2 by make lab-extended;
                      the lab's filter figure is for 1e-4
    --batch-size 50   as in the lab's progress figure
After each epoch, evaluate() scores the model on the training and validation sets (loss, accuracy, macro
precision and recall, all from the confusion matrix); the best-validation model is kept and tested at the end.

Writes into <save-dir>/<run-name>/:
    training_plot.png        the lab's figure: loss, accuracy, learning rate, validation macro P/R per epoch
    conv1_epoch_EE_step_SSSSSS.png   conv1's filters as RGB, at initialisation and after every epoch
    confusion_matrix.png     test confusion matrix of the best-validation model
    misclassified.png        the 20 misclassified test images with the highest loss, with the top-3 classes
                             (also printed, and in results.json under 'worst_mistakes')
    best_model.pt            state_dict of the best-validation model (torch.load(..., weights_only=True))
    results.json             config, per-epoch scores, test scores, per-class precision and recall, speed
    checkpoint.pt            after every epoch and on Ctrl-C / SIGTERM, what --resume continues from
"""
import argparse
import os

# Before torch starts its OpenMP threads: idle ones sleep instead of spinning. Spinning, they wait for each
# other whenever anything else runs on the machine, and a training step takes many times longer (README).
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')

import torch
import torch.nn as nn
import torch.nn.functional as F

import checkpoint
import cli
import data
import metrics
import plots
from run import Run

SCRIPT = 'train_cifar'
EPOCHS, BATCH_SIZE, LR, GAMMA, WEIGHT_DECAY, PADDING, VALID_SIZE = 8, 50, 0.1, 0.7, 1e-3, 2, 5000


def make_parser():
    parser = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_flags(parser, *cli.RUN_FLAGS, 'device', 'epochs', 'batch_size', 'lr', 'gamma', 'weight_decay', 'padding',
                  'valid_size', 'limit', epochs=EPOCHS, batch_size=BATCH_SIZE, lr=LR, gamma=GAMMA,
                  weight_decay=WEIGHT_DECAY, padding=PADDING, valid_size=VALID_SIZE)
    return parser


def parse_args(argv=None):
    """The flags, with what depends on CIFAR-10's size checked before any work."""
    args = cli.parse_args(make_parser(), SCRIPT, argv)
    check_cifar_args(args)
    return args


def check_cifar_args(args):
    """What depends on CIFAR-10's size (the published files') and on the machine's memory, before any work."""
    num_train = data.CIFAR_TRAIN_SIZE - args.valid_size
    if num_train <= 0:
        raise cli.UserError(f"--valid-size {args.valid_size} leaves no CIFAR-10 training images")
    cli.check_batch_size(args.batch_size, min(args.limit or num_train, num_train),
                         "left by --limit" if args.limit else "of CIFAR-10")
    # every layer's output per image (float32), in a training step with its gradient and ReLU's copy, in an
    # evaluation batch once; and the data set
    outputs = []
    model = ConvNet(args.padding)
    for module in model.children():
        module.register_forward_hook(lambda module, inputs, output: outputs.append(output.numel()))
    with torch.no_grad():
        model(torch.zeros(1, 3, 32, 32))
    images = data.CIFAR_TRAIN_SIZE + 10_000
    cli.check_memory(f"--batch-size {args.batch_size}",
                     4 * sum(outputs) * max(3 * args.batch_size, metrics.EVAL_BATCH_SIZE) + images * 3072 * 4)


class ConvNet(nn.Module):
    """The lab's CIFAR-10 model; input (N, 3, 32, 32) normalised images -> logits (N, num_classes)."""

    def __init__(self, padding=PADDING, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, kernel_size=5, padding=padding)
        self.conv2 = nn.Conv2d(16, 32, kernel_size=5, padding=padding)
        self.pool = nn.MaxPool2d(kernel_size=3, stride=2)
        side = 32
        for _ in range(2):
            side = (side + 2 * padding - 5 + 1 - 3) // 2 + 1  # conv, then pool
        self.fc1 = nn.Linear(32 * side * side, 256)
        self.fc2 = nn.Linear(256, 128)
        self.logits = nn.Linear(128, num_classes)

    def forward(self, x):
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = F.relu(self.fc1(x.flatten(1)))
        x = F.relu(self.fc2(x))
        return self.logits(x)


def cifar10_tensors(args, device):
    """The lab's split and normalisation (data.prepare_cifar10) as tensors on `device`, --limit applied."""
    prepared = data.prepare_cifar10(args.data_dir, valid_size=args.valid_size, seed=args.seed)
    dataset = {key: torch.from_numpy(prepared[key]).to(device) for key in
               ('train_x', 'train_y', 'valid_x', 'valid_y', 'test_x', 'test_y')}
    if args.limit:
        dataset['train_x'], dataset['train_y'] = dataset['train_x'][:args.limit], dataset['train_y'][:args.limit]
    cli.check_batch_size(args.batch_size, len(dataset['train_y']), f"in {args.data_dir}")
    dataset.update({key: prepared[key] for key in ('data_mean', 'data_std', 'class_names', 'originals')})
    # every number measured on the stand-in must say so
    dataset['name'] = 'CIFAR-10' if prepared['originals'] else 'CIFAR-10 (JPEG stand-in)'
    print(f"{os.path.join(args.data_dir, data.CIFAR_FOLDER)}: "
          f"{'' if prepared['originals'] else 'not the published files (MD5s differ), accepted by their structure; '}"
          f"{len(dataset['train_x'])} training, {len(dataset['valid_x'])} validation, "
          f"{len(dataset['test_x'])} test images, on {device}")
    return dataset


def worst_mistakes(logits, y, loss_fn, class_names, count=20):
    """The `count` misclassified examples with the highest loss, highest first: dicts of their index, true
    class, loss and the three classes of highest softmax probability. logits (N, C), y (N,)."""
    losses = loss_fn(logits, y, reduction='none')
    wrong = torch.nonzero(logits.argmax(dim=1) != y).flatten()
    worst = wrong[losses[wrong].argsort(descending=True)[:count]]
    top_p, top_class = F.softmax(logits[worst], dim=1).topk(3, dim=1)
    return [{'index': i, 'true': class_names[y[i]], 'loss': losses[i].item(),
             'top3': [[class_names[c], p] for c, p in zip(classes.tolist(), probabilities.tolist())]}
            for i, probabilities, classes in zip(worst.tolist(), top_p, top_class)]


def format_mistake(mistake):
    top3 = ', '.join(f"{name} {p:.2f}" for name, p in mistake['top3'])
    return f"{mistake['index']:5d}: {mistake['true']:10s} loss {mistake['loss']:7.3f}; top 3: {top3}"


def train(model, optimizer, scheduler, dataset, run, batch_size, loss_fn, loss_name):
    """The lab's loop: every epoch a new order of the training images, SGD on its mini-batches, then evaluate()
    on the training and validation sets; the best-validation model is kept in best_model.pt."""
    train_x, train_y = dataset['train_x'], dataset['train_y']
    for epoch in run.epochs():
        lr = scheduler.get_last_lr()[0]
        order = torch.from_numpy(run.rng.permutation(len(train_y))).to(train_y.device)  # the lab's shuffle_data
        model.train()
        for step in run.steps():
            batch = order[step * batch_size:(step + 1) * batch_size]
            loss = loss_fn(model(train_x[batch]), train_y[batch])
            run.check_loss(loss)  # a NaN stops the run here, before it reaches the weights
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        scheduler.step()
        train_scores = metrics.evaluate(model, train_x, train_y, loss_fn)
        valid = metrics.evaluate(model, dataset['valid_x'], dataset['valid_y'], loss_fn)
        run.check_loss(train_scores['loss'])  # a diverged model stops here, before best_model.pt is written
        if valid['accuracy'] > run.results.get('best_valid_acc', -1):
            run.results.update(best_epoch=epoch, best_valid_acc=valid['accuracy'])
            checkpoint.save_torch(os.path.join(run.dir, BEST), {k: v.cpu() for k, v in model.state_dict().items()})
        plots.draw_conv_filters(epoch, run.step, model.conv1.weight.detach().cpu().numpy(), run.dir)
        run.end_epoch(lr=lr, train=train_scores, valid=valid)
        plots.plot_training_progress(run.dir, plots.history(run.results['epochs']), loss_name,
                                     title=f"{dataset['name']}, {loss_name.lower()}")


BEST = 'best_model.pt'


def train_model(args, dataset, run_dir, loss_fn=F.cross_entropy, loss_name='Cross-entropy loss'):
    """Trains, evaluates and tests one model with loss_fn(logits, y, reduction='mean'|'none'); writes run_dir;
    returns the results. With --resume, a finished run is read back and an unfinished one goes on."""
    cli.seed_everything(args.seed)  # the same initial weights for every loss
    model = ConvNet(args.padding, len(dataset['class_names'])).to(dataset['train_x'].device)
    weights = [p for name, p in model.named_parameters() if name.endswith('weight')]
    biases = [p for name, p in model.named_parameters() if name.endswith('bias')]
    optimizer = torch.optim.SGD([{'params': weights, 'weight_decay': args.weight_decay},
                                 {'params': biases, 'weight_decay': 0.0}], lr=args.lr)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=args.gamma)
    data_info = {key: dataset[key] for key in ('name', 'originals', 'data_mean', 'data_std')} | {
        f'num_{split}': len(dataset[f'{split}_y']) for split in ('train', 'valid', 'test')}
    run = Run(run_dir, args.seed, args.resume is not None, args.epochs, len(dataset['train_y']), args.batch_size,
              state_dicts={'model': model, 'optimizer': optimizer, 'scheduler': scheduler},
              results={'script': f'{SCRIPT}.py', 'config': vars(args), 'data': data_info, 'loss': loss_name})
    if run.finished:
        best_path = os.path.join(run_dir, BEST)
        checkpoint.load_state_dict(ConvNet(args.padding, len(dataset['class_names'])), checkpoint.load_torch(best_path),
                                   best_path)
        print(f"{run_dir} finished already: test accuracy {run.results['test']['accuracy']:.2%}")
        return run.results
    if not run.resumed:
        plots.draw_conv_filters(0, 0, model.conv1.weight.detach().cpu().numpy(), run_dir)

    train(model, optimizer, scheduler, dataset, run, args.batch_size, loss_fn, loss_name)

    best_path = os.path.join(run_dir, BEST)
    checkpoint.load_state_dict(model, checkpoint.load_torch(best_path), best_path)
    test(model, dataset, run, loss_fn, loss_name)
    return run.results


def test(model, dataset, run, loss_fn, loss_name):
    """Scores the best-validation model on the test set: the printed report, confusion_matrix.png, the 20
    worst mistakes (printed, and drawn in misclassified.png) and the final results."""
    names, epoch = dataset['class_names'], run.results['best_epoch']
    logits = metrics.predict_logits(model, dataset['test_x'])
    scores = metrics.scores_from_logits(logits, dataset['test_y'], loss_fn)
    metrics.print_scores(scores, names, title=f"{dataset['name']} test, model of epoch {epoch}: ")
    plots.save_confusion_matrix(os.path.join(run.dir, 'confusion_matrix.png'), scores['confusion'], names,
                                title=f"{dataset['name']} test, {loss_name.lower()}: accuracy {scores['accuracy']:.2%}")
    mistakes = worst_mistakes(logits, dataset['test_y'].cpu(), loss_fn, names)
    print(f"the {len(mistakes)} misclassified test images with the highest loss (index: true class, loss; "
          f"top 3 classes by softmax probability):\n" + '\n'.join(map(format_mistake, mistakes)))
    test_x = dataset['test_x'].cpu().numpy()
    plots.save_image_grid(
        os.path.join(run.dir, 'misclassified.png'),
        [plots.draw_image(test_x[m['index']], dataset['data_mean'], dataset['data_std']) for m in mistakes],
        [f"true: {m['true']}\n" + '\n'.join(f"{name} {p:.2f}" for name, p in m['top3']) for m in mistakes],
        title=f"{dataset['name']}: the {len(mistakes)} misclassified test images with the highest "
              f"{loss_name.lower()}; true class and top-3 predictions" + (
                  '' if loss_fn is F.cross_entropy else
                  "\n(a softmax of the model's scores, for display only: they are not probabilities)"))
    run.finish(test=metrics.summary(scores, names), worst_mistakes=mistakes)
    print(f"{dataset['name']}, {loss_name.lower()}: best validation accuracy {run.results['best_valid_acc']:.2%} "
          f"(epoch {epoch}), test accuracy {scores['accuracy']:.2%}; training {run.results['seconds_per_epoch']:.1f} "
          f"s/epoch, {run.results['images_per_second']:.0f} img/s; wrote {run.dir}")


def main(argv=None):
    args = parse_args(argv)
    dataset = cifar10_tensors(args, cli.torch_device(args.device))
    with cli.run_folder(args, SCRIPT, argv) as run_dir:
        train_model(args, dataset, run_dir)


if __name__ == '__main__':
    cli.run(main)
