"""Lab 2, task 4: the lab's convolutional model on CIFAR-10, in PyTorch.

    python train_cifar.py --data-dir data        # the lab's run: 8 epochs, ~70% validation accuracy
    python train_cifar.py --resume runs/<run-name>   # go on after Ctrl-C or a kill, from the last epoch

Model (the lab's):  conv(16,5) -> relu -> pool(3,2) -> conv(32,5) -> relu -> pool(3,2)
                    -> fc(256) -> relu -> fc(128) -> relu -> fc(10)
The lab does not say whether the 5x5 convolutions are padded. --padding 2 (default) keeps 32x32 maps,
so the second conv and the classifier see more of every image; it reaches ~70% like the lab's
plot, and padding 0 loses a quarter of each map's area per conv. The 3x3/2 max-pools floor (PyTorch's
default ceil_mode=False): n pixels -> (n - 3) // 2 + 1. Shapes per image:
    padding 2:  3x32x32 -> conv1 16x32x32 -> pool 16x15x15 -> conv2 32x15x15 -> pool 32x7x7 -> 1568 -> 256 -> 128 -> 10
    padding 0:  3x32x32 -> conv1 16x28x28 -> pool 16x13x13 -> conv2 32x9x9   -> pool 32x4x4 -> 512  -> 256 -> 128 -> 10

Training: plain SGD with L2 weight decay (on every parameter, as torch.optim.SGD applies it), mini-batches
of 50, the learning rate multiplied by --gamma after every epoch (ExponentialLR). After each epoch the
model is evaluated on the training and validation sets; the lab's progress figure, the conv1 filters and
results.json are rewritten, and the best-validation model is saved. At the end that model is tested.

Writes into <save-dir>/<run-name>/:
    training_progress.png    loss, accuracy, learning rate (train vs validation) and validation macro P/R per epoch
    conv1_epoch_00.png ...   conv1's filters as RGB, at initialisation and after every epoch
    confusion_matrix.png     test confusion matrix of the best-validation model
    misclassified.png        the 20 misclassified test images with the highest loss, with the top-3 classes
    best_model.pt            state_dict of the best-validation model (torch.load(..., weights_only=True))
    results.json             config, per-epoch metrics, test scores, per-class precision/recall, speed
    checkpoint.pt            after every epoch and on Ctrl-C / SIGTERM: model, optimizer, scheduler, RNG states,
                             results so far
                             (weights_only=True too); --resume continues from it bit for bit
    config.json              the command line, which --resume reads
"""
import argparse
import functools
import json
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, TensorDataset

import checkpoint
import cli
import data
import metrics
import plots
from hinge_loss import multiclass_hinge_loss

LOSS_TITLES = {'ce': 'Cross-entropy loss', 'hinge': 'Multiclass hinge loss'}
DEFAULT_LR = {'ce': 0.1, 'hinge': 0.01}


def add_training_args(parser):
    """Everything but the loss: shared with hinge_loss.py, so both train exactly the same way."""
    cli.add_common_args(parser, resume=True)
    parser.add_argument('--epochs', type=cli.positive_int, default=8, help='number of epochs (default: 8)')
    parser.add_argument('--batch-size', type=cli.positive_int, default=50, help='mini-batch size (default: 50)')
    parser.add_argument('--lr', type=cli.positive_float, default=None,
                        help='SGD learning rate of the first epoch (default: 0.1 with cross-entropy, 0.01 with '
                             'the hinge loss, whose gradients are ~7x larger: at 0.1 it diverges)')
    parser.add_argument('--gamma', type=cli.positive_float, default=0.7,
                        help='ExponentialLR: the learning rate is multiplied by this after every epoch (default: 0.7)')
    parser.add_argument('--weight-decay', type=cli.non_negative_float, default=1e-3,
                        help='L2 weight decay of SGD (default: 1e-3)')
    parser.add_argument('--padding', type=int, choices=[0, 1, 2], default=2,
                        help='zero padding of both 5x5 convolutions; 2 keeps 32x32 maps, see above (default: 2)')
    parser.add_argument('--delta', type=cli.non_negative_float, default=1.0,
                        help='margin of the hinge loss (default: 1.0)')
    parser.add_argument('--valid-size', type=cli.positive_int, default=5000,
                        help='random training images (seeded) held out for validation (default: 5000)')
    parser.add_argument('--limit', type=cli.positive_int, default=None,
                        help='train on the first N training images only (quick runs)')
    parser.add_argument('--device', choices=['auto', 'cpu', 'cuda'], default='auto',
                        help='auto: the GPU if there is one, else the CPU (default: auto)')


class ConvNet(nn.Module):
    """The lab's CIFAR-10 model; input (N, 3, 32, 32) normalised images -> logits (N, num_classes)."""

    def __init__(self, padding=2, num_classes=10):
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


def make_loss(name, delta):
    """'ce' | 'hinge' -> loss_fn(logits, y, reduction='mean'|'none')."""
    return F.cross_entropy if name == 'ce' else functools.partial(multiclass_hinge_loss, delta=delta)


def load_data(args, device):
    """The lab's split and normalisation (data.prepare_cifar10) as tensors on `device`, --limit applied."""
    prepared = data.prepare_cifar10(args.data_dir, valid_size=args.valid_size, seed=args.seed)
    dataset = {key: torch.from_numpy(prepared[key]).to(device) for key in
               ('train_x', 'train_y', 'valid_x', 'valid_y', 'test_x', 'test_y')}
    if args.limit:
        dataset['train_x'], dataset['train_y'] = dataset['train_x'][:args.limit], dataset['train_y'][:args.limit]
    dataset.update({key: prepared[key] for key in ('mean', 'std', 'class_names', 'originals')})
    # every number measured on the stand-in must say so
    dataset['name'] = 'CIFAR-10' if prepared['originals'] else 'CIFAR-10 (JPEG stand-in)'
    print(f"{os.path.join(args.data_dir, data.CIFAR_FOLDER)}: "
          f"{'' if prepared['originals'] else 'not the published files (MD5s differ), accepted by their structure; '}"
          f"{len(dataset['train_x'])} training, {len(dataset['valid_x'])} validation, "
          f"{len(dataset['test_x'])} test images")
    return dataset


def batch_loader(x, y, batch_size, generator):
    """Shuffled mini-batches of in-memory tensors. The BatchSampler hands the dataset a whole batch of
    indices at once, so a batch is one indexing operation, as with plain slicing (batch_size=None turns
    off per-sample fetching and collating, which takes twice as long; either way it is a small
    fraction of a second per epoch, next to the ~18 s of training)."""
    dataset = TensorDataset(x, y)
    sampler = BatchSampler(RandomSampler(dataset, generator=generator), batch_size, drop_last=False)
    return DataLoader(dataset, sampler=sampler, batch_size=None)


def summary(scores, class_names):
    """evaluate()'s dict -> JSON-friendly, per-class scores keyed by class name."""
    return {'loss': scores['loss'], 'accuracy': scores['accuracy'],
            'macro_precision': scores['macro_precision'], 'macro_recall': scores['macro_recall'],
            'precision': dict(zip(class_names, scores['precision'])),
            'recall': dict(zip(class_names, scores['recall'])), 'confusion': scores['confusion']}


def worst_mistakes(logits, y, loss_fn, count):
    """Indices of the (at most) `count` misclassified examples with the highest loss, highest first."""
    losses = loss_fn(logits, y, reduction='none')
    wrong = torch.nonzero(logits.argmax(dim=1) != y).flatten()
    return wrong[losses[wrong].argsort(descending=True)[:count]]


def save_misclassified(path, logits, dataset, loss_fn, loss, count=20):
    """The `count` misclassified test images with the highest loss, each titled with its true class and
    the model's three top classes with their softmax probabilities; logits (N, C) of the test images."""
    y = dataset['test_y'].cpu()
    worst = worst_mistakes(logits, y, loss_fn, count)
    top_p, top_class = F.softmax(logits[worst], dim=1).topk(3, dim=1)
    names = dataset['class_names']
    titles = [f"true: {names[y[i]]}\n" + '\n'.join(f"{names[c]} {p:.2f}" for p, c in zip(ps.tolist(), cs.tolist()))
              for i, ps, cs in zip(worst.tolist(), top_p, top_class)]
    images = data.denormalise(dataset['test_x'][worst].cpu().numpy(), dataset['mean'], dataset['std'])
    title = (f"{dataset['name']}: the {len(worst)} misclassified test images with the highest "
             f"{LOSS_TITLES[loss].lower()}; true class and top-3 predictions")
    if loss == 'hinge':
        title += "\n(softmax of the hinge model's scores, for display only: they are not probabilities)"
    plots.save_image_grid(path, images, titles, title=title)


def train(args, dataset, run_dir, loss, device, resume=False):
    """Trains, evaluates and tests one model with loss 'ce' or 'hinge'; writes run_dir; returns results.json's dict.

    Writes checkpoint.pt before the first epoch, after every epoch and when Ctrl-C or SIGTERM stops it
    between two steps. With resume=True a run that finished in run_dir is read back, and an unfinished
    one continues from its checkpoint.pt.
    """
    os.makedirs(run_dir, exist_ok=True)
    finished = resume and checkpoint.finished_results(run_dir, 'test')
    if finished:
        print(f"{run_dir} finished already: test accuracy {finished['test']['accuracy']:.2%}")
        return finished
    checkpoint_path = os.path.join(run_dir, checkpoint.PT)
    state = checkpoint.load_torch(checkpoint_path) if resume and os.path.exists(checkpoint_path) else None
    cli.seed_everything(args.seed)  # the same initial weights and batch order for every loss
    loss_fn = make_loss(loss, args.delta)
    train_x, train_y = dataset['train_x'], dataset['train_y']
    class_names = dataset['class_names']
    lr = args.lr or DEFAULT_LR[loss]
    model = ConvNet(args.padding, len(class_names)).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=args.gamma)
    generator = torch.Generator().manual_seed(args.seed)
    loader = batch_loader(train_x, train_y, args.batch_size, generator)
    best_path = os.path.join(run_dir, 'best_model.pt')

    def save_checkpoint(epochs_done, batches_done=0, epoch_generator=None, epoch_seconds=0.0):
        """epoch_generator: the batch order generator's state at the start of epoch epochs_done + 1 (default: now)."""
        checkpoint.save_torch(checkpoint_path, {
            'epoch': epochs_done, 'batches_done': batches_done, 'model': model.state_dict(),
            'optimizer': optimizer.state_dict(), 'scheduler': scheduler.state_dict(),
            'generator': generator.get_state() if epoch_generator is None else epoch_generator,
            'torch_rng': torch.get_rng_state(), 'epoch_seconds': epoch_seconds, 'best_acc': float(best_acc),
            'results': checkpoint.results_text(results), 'best_valid': checkpoint.results_text(best_valid)})

    if state is None:
        plots.save_filter_grid(os.path.join(run_dir, 'conv1_epoch_00.png'), model.conv1.weight.detach().cpu().numpy())
        history = {key: [] for key in ('train_loss', 'valid_loss', 'train_acc', 'valid_acc', 'lr',
                                       'valid_macro_precision', 'valid_macro_recall', 'train_seconds',
                                       'epoch_seconds')}
        results = {'script': 'train_cifar.py', 'config': vars(args) | {'lr': lr}, 'loss': loss, 'device': str(device),
                   'data': {'name': dataset['name'], 'originals': dataset['originals'], 'num_train': len(train_x),
                            'num_valid': len(dataset['valid_x']), 'num_test': len(dataset['test_x']),
                            'mean': dataset['mean'], 'std': dataset['std']},
                   'history': history, 'best_epoch': None}
        done, best_acc, best_valid = 0, -1.0, None  # best_valid: summary() of the best epoch's validation scores
        save_checkpoint(0)
    else:
        checkpoint.restore_torch(state, model, optimizer, scheduler, generator)
        results, best_valid = json.loads(state['results']), json.loads(state['best_valid'])
        history, done, best_acc = results['history'], state['epoch'], state['best_acc']
        print(checkpoint.resuming(run_dir, done, args.epochs, state['batches_done'], len(loader)))
    with cli.stop_between_steps():
        for epoch in range(done + 1, args.epochs + 1):
            start = time.perf_counter() - (state['epoch_seconds'] if state else 0.0)
            model.train()
            progress, batches = checkpoint.torch_epoch(
                loader, generator, epoch, f"{loss} epoch {epoch}/{args.epochs}",
                lambda steps_done, epoch_generator: save_checkpoint(
                    epoch - 1, steps_done, epoch_generator, time.perf_counter() - start), resumed=state)
            state = None  # only the first epoch resumes
            for step, (x, y) in batches:
                batch_loss = loss_fn(model(x), y)
                optimizer.zero_grad(set_to_none=True)
                batch_loss.backward()
                optimizer.step()
                if step % 100 == 0:
                    progress.set_postfix(loss=f"{batch_loss.item():.3f}")
            train_seconds = time.perf_counter() - start
            history['lr'].append(scheduler.get_last_lr()[0])  # the rate this epoch used
            scheduler.step()

            train_scores = metrics.evaluate(model, train_x, train_y, loss_fn)
            if not np.isfinite(train_scores['loss']):
                raise cli.UserError(f"{loss} training diverged in epoch {epoch} (loss {train_scores['loss']}); "
                                    f"lower --lr (it was {history['lr'][-1]:.4g})")
            valid_scores = metrics.evaluate(model, dataset['valid_x'], dataset['valid_y'], loss_fn)
            for split, scores in (('train', train_scores), ('valid', valid_scores)):
                history[f'{split}_loss'].append(scores['loss'])
                history[f'{split}_acc'].append(scores['accuracy'])
            history['valid_macro_precision'].append(valid_scores['macro_precision'])
            history['valid_macro_recall'].append(valid_scores['macro_recall'])
            if valid_scores['accuracy'] > best_acc:
                best_acc, results['best_epoch'] = valid_scores['accuracy'], epoch
                best_valid = summary(valid_scores, class_names)
                checkpoint.save_torch(best_path, {name: value.cpu() for name, value in model.state_dict().items()})
            plots.save_filter_grid(os.path.join(run_dir, f'conv1_epoch_{epoch:02d}.png'),
                                   model.conv1.weight.detach().cpu().numpy())
            plots.plot_progress_2x2(os.path.join(run_dir, 'training_progress.png'), history, LOSS_TITLES[loss],
                                    title=f"{dataset['name']}, {LOSS_TITLES[loss].lower()}")
            history['train_seconds'].append(train_seconds)
            history['epoch_seconds'].append(time.perf_counter() - start)
            print(f"{loss} epoch {epoch}/{args.epochs}: "
                  f"train loss {train_scores['loss']:.4f} acc {train_scores['accuracy']:.2%} | "
                  f"valid loss {valid_scores['loss']:.4f} acc {valid_scores['accuracy']:.2%} | "
                  f"lr {history['lr'][-1]:.4g} | {len(train_x) / train_seconds:.0f} img/s")
            cli.write_json(os.path.join(run_dir, 'results.json'), results)  # a stopped run keeps its curves
            save_checkpoint(epoch)

    model.load_state_dict(checkpoint.load_torch(best_path))
    test_logits = metrics.predict_logits(model, dataset['test_x'])
    test_scores = metrics.scores_from_logits(test_logits, dataset['test_y'], loss_fn)
    metrics.print_scores(test_scores, class_names,
                         title=f"{dataset['name']} test, {loss}, model of epoch {results['best_epoch']}: ")
    plots.save_confusion_matrix(os.path.join(run_dir, 'confusion_matrix.png'), test_scores['confusion'], class_names,
                                title=f"{dataset['name']} test, {LOSS_TITLES[loss].lower()}: "
                                      f"accuracy {test_scores['accuracy']:.2%}")
    save_misclassified(os.path.join(run_dir, 'misclassified.png'), test_logits, dataset, loss_fn, loss)
    results.update(valid=best_valid, test=summary(test_scores, class_names),
                   seconds_per_epoch=float(np.mean(history['train_seconds'])),
                   images_per_second=len(train_x) * args.epochs / sum(history['train_seconds']))
    cli.write_json(os.path.join(run_dir, 'results.json'), results)
    print(f"{dataset['name']}, {loss}: best validation accuracy {best_acc:.2%} (epoch {results['best_epoch']}), "
          f"test accuracy {test_scores['accuracy']:.2%}; training {results['seconds_per_epoch']:.1f} s/epoch, "
          f"{results['images_per_second']:.0f} img/s; wrote {run_dir}")
    return results


def make_parser():
    parser = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_args(parser)
    parser.add_argument('--loss', choices=['ce', 'hinge'], default='ce',
                        help='cross-entropy, or the multiclass hinge loss of hinge_loss.py with --delta (default: ce)')
    return parser


def main(argv=None):
    args = cli.parse_args(make_parser(), 'train_cifar', argv)
    device = cli.torch_device(args.device)
    dataset = load_data(args, device)
    run_dir = cli.open_run_dir(args, 'train_cifar', argv)
    with cli.resume_hint('train_cifar', run_dir):
        train(args, dataset, run_dir, args.loss, device, resume=args.resume is not None)


if __name__ == '__main__':
    cli.run(main)
