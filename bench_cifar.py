"""Training speed of the lab's CIFAR-10 model and of train_cifar_fast.py's FastNet, and time-to-accuracy curves.

    python bench_cifar.py                                         # img/s of both models, side by side
    python bench_cifar.py --precision fp32 --optimizer sgd muon --batch-size 256 512   # FastNet variants
    python bench_cifar.py runs/fast-seed0 runs/fast-seed1         # ... and their curves in one figure

Speed: full training steps on random images, on the CPU or the GPU, each model as its script trains it:
the lab's ConvNet with mini-batches of 50 in float32 and plain SGD; FastNet with train_cifar_fast.py's
own step (batched augmentation, channels_last, autocast, its optimizers with the CPU preset's settings),
one contender for every combination of --widths, --batch-size, --optimizer and --precision. The models
take turns, round after round, and the median round is reported, so that other work on a shared machine
slows them alike; a ratio measured here is meaningful, an absolute number only on an idle machine.
FLOPs per image are the model's, counted by torch.utils.flop_counter (training step = forward + backward;
the optimizer's work, such as Muon's Newton-Schulz iterations, is not in them).

Writes into <save-dir>/<run-name>/: config.json (the command line), results.json (speeds, FLOPs, the machine,
the runs' final accuracies and times to 85/90/94%) and, given runs, time_to_accuracy.png (test accuracy against
training seconds).
"""
import argparse
import itertools
import os
import time

# Before torch starts its OpenMP threads: idle ones sleep instead of spinning. Spinning, they wait for each
# other whenever anything else runs on the machine, and a training step takes many times longer (README).
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import cli
import readback
from plots import plot_time_to_accuracy
from train_cifar import ConvNet
from train_cifar_fast import (PRESETS, TARGETS, FastNet, augment, autocast_for, make_optimizers, make_train_step,
                              set_lr, step_bytes, widths)

SCRIPT = 'bench_cifar'
LAB = 'lab ConvNet, batch 50, fp32, sgd'
REACHED = [f'{t:.0%}' for t in TARGETS]  # the keys of a run's seconds_to_accuracy
SECONDS_OR_NONE = (float, type(None))
# What the bench reads of a train_cifar_fast.py results.json, checked before it is used (readback)
RUN_RESULTS = {'script': str, 'data': str, 'summary': dict, 'runs': [{
    'seed': readback.COUNT, 'train_seconds': readback.Number(0), 'test': {'accuracy': readback.Number(0, 1)},
    'seconds_to_accuracy': {key: SECONDS_OR_NONE for key in REACHED},
    'history': {'seconds': [readback.Number(0)], 'test_acc': [readback.Number(0, 1)], 'train_loss': [SECONDS_OR_NONE]}}]}


def make_parser():
    parser = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_flags(parser, 'save_dir', 'run_name', 'overwrite', 'seed', 'device')
    parser.add_argument('runs', nargs='*', help="train_cifar_fast.py run folders (or their results.json) to plot")
    parser.add_argument('--widths', type=widths, nargs='+', default=[(64, 128, 256)],
                        help="FastNet's widths, one or more (default: 64,128,256)")
    parser.add_argument('--batch-size', type=cli.positive_int, nargs='+', default=[512],
                        help="FastNet's batch, one or more (default: 512)")
    parser.add_argument('--optimizer', choices=['sgd', 'muon'], nargs='+', default=['sgd'],
                        help="FastNet's optimizer, one or more (default: sgd)")
    parser.add_argument('--precision', choices=['fp32', 'bf16'], nargs='+', default=['fp32', 'bf16'],
                        help="FastNet's autocast, one or more (default: fp32 bf16)")
    parser.add_argument('--rounds', type=cli.positive_int, default=3, help='rounds of turns (default: 3)')
    parser.add_argument('--images', type=cli.positive_int, default=2048,
                        help='training images per model per round (default: 2048)')
    parser.add_argument('--threads', type=cli.positive_int, default=None, help='CPU threads (default: all available)')
    return parser


def parse_args(argv=None):
    parser = make_parser()
    parser.set_defaults(resume=None)  # nothing to resume, but cli.parse_args's checks of --save-dir and --run-name
    args = cli.parse_args(parser, SCRIPT, argv)
    if args.threads:
        cli.check_threads(args.threads)
    return args


def lab_step(model, device):
    """One step of the lab's ConvNet (SGD, float32) on random images, as a closure."""
    model = model.to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, nesterov=True)
    x = torch.randn(50, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (50,), device=device)

    def step():
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def fast_step(model, batch_size, optimizer, precision, device):
    """One step of train_cifar_fast.py's FastNet on random images, as a closure; the learning rates are a
    hundredth of the preset's, so that the random labels cannot make the weights blow up mid-benchmark."""
    args = argparse.Namespace(**PRESETS['cpu'] | {'optimizer': optimizer, 'batch_size': batch_size})
    model = model.to(device, memory_format=torch.channels_last)
    optimizers = make_optimizers(model, args)
    set_lr(optimizers, 0.99, warmup=0.0)  # 1% of the way before the end: a hundredth of the peak lrs
    step = make_train_step(model, optimizers, autocast_for(device, precision), precision, label_smoothing=0.2)
    x = torch.randn(batch_size, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch_size,), device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    return lambda: step(augment(x, generator), y)


def flops_per_image(model, device):
    x = torch.randn(2, 3, 32, 32, device=device)
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model.to(device)(x), torch.zeros(2, dtype=torch.long, device=device)).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / 2


def measure_speeds(args, device):
    """{contender: images per second (median round), all rounds, batch size, GFLOPs}: the lab's model, then
    one FastNet for every combination of the widths, batch sizes, optimizers and precisions asked for."""
    lab = ConvNet()
    contenders = {LAB: (lab, 50, lab_step(lab, device))}
    for w, batch_size, optimizer, precision in itertools.product(args.widths, args.batch_size, args.optimizer,
                                                                 args.precision):
        model = FastNet(w)
        name = f"FastNet {'/'.join(map(str, w))}, batch {batch_size}, {precision}, {optimizer}"
        contenders[name] = (model, batch_size, fast_step(model, batch_size, optimizer, precision, device))
    flops = {name: flops_per_image(model, device) for name, (model, _, _) in contenders.items()}
    for _, _, step in contenders.values():  # warm-up: one-time allocations and kernel choices
        step()
        step()
    speeds = {name: [] for name in contenders}
    bar = cli.progress_bar(args.rounds, desc='rounds')
    for _ in range(args.rounds):
        for name, (_, batch_size, step) in contenders.items():
            count = max(1, args.images // batch_size)
            if device.type == 'cuda':
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(count):
                step()
            if device.type == 'cuda':
                torch.cuda.synchronize()
            speeds[name].append(count * batch_size / (time.perf_counter() - start))
        bar.update()
    bar.close()
    return {name: {'images_per_second': float(np.median(s)), 'all_rounds': s, 'batch_size': contenders[name][1],
                   'training_gflops_per_image': flops[name] / 1e9,
                   'achieved_gflops_per_second': flops[name] * float(np.median(s)) / 1e9}
            for name, s in speeds.items()}


def read_run(path):
    """The results of a train_cifar_fast.py run, from its folder or its results.json, read as lab.py reads
    results (readback): a file too large, nested too deep, not JSON, or without what the bench uses is one
    line naming it."""
    path = os.path.join(path, 'results.json') if os.path.isdir(path) else path
    results = readback.read_json(path, RUN_RESULTS)
    if results['script'] != 'train_cifar_fast.py':
        raise readback.ReadBackError(f"{path}: not a train_cifar_fast.py run's results but those of {results['script'][:60]!r}")
    for run in results['runs']:
        history = run['history']
        if not len(history['seconds']) == len(history['test_acc']) == len(history['train_loss']):
            raise readback.ReadBackError(f"{path}: the history of seed {run['seed']} has lists of different lengths")
        run['seconds_to_accuracy'] = {key: run['seconds_to_accuracy'][key] for key in REACHED}  # only what was checked
    return results


def main(argv=None):
    args = parse_args(argv)
    runs = {path: read_run(path) for path in args.runs}  # before any work: a bad file is one line
    device = cli.torch_device(args.device)
    if device.type == 'cpu':  # the largest FastNet step, weighed before any work (on a GPU it is the GPU's memory)
        cli.check_memory(f"--batch-size {max(args.batch_size)}",
                         max(step_bytes(w, max(args.batch_size)) for w in args.widths))
    if args.threads:
        torch.set_num_threads(args.threads)
    cli.seed_everything(args.seed)

    load_at_start = os.getloadavg()
    speeds = measure_speeds(args, device)
    print(f"training speed on {device} ({torch.get_num_threads()} threads; load average {load_at_start[0]:.2f} at start, "
          f"{os.getloadavg()[0]:.2f} at end; the models took turns, median of {args.rounds} rounds):")
    lab = speeds[LAB]['images_per_second']
    first_fast = speeds[list(speeds)[1]]['images_per_second']
    for name, s in speeds.items():
        print(f"  {name:<48} {s['images_per_second']:8.0f} img/s  {s['training_gflops_per_image']:6.3f} GFLOP/img  "
              f"{s['achieved_gflops_per_second']:6.1f} GFLOP/s  {s['images_per_second'] / lab:5.2f}x the lab model's, "
              f"{s['images_per_second'] / first_fast:5.3f}x the first FastNet's img/s")

    results = {'script': f'{SCRIPT}.py', 'config': vars(args), 'machine': cli.machine(), 'device': str(device),
               'speeds': speeds, 'load_average_at_start': load_at_start, 'load_average_at_end': os.getloadavg(),
               'runs': {}}
    curves = {}
    for path, run_results in runs.items():
        label = os.path.basename(os.path.dirname(path) if path.endswith('.json') else os.path.normpath(path))
        for run in run_results['runs']:
            curves[f"{label} seed {run['seed']}"] = run['history']
            reached = ', '.join(f"{k} {'-' if v is None else f'{v:.0f} s'}" for k, v in run['seconds_to_accuracy'].items())
            print(f"{label} seed {run['seed']}: test accuracy {run['test']['accuracy']:.2%} ({run_results['data']}) "
                  f"after {run['train_seconds']:.0f} s of training; time to {reached}")
        results['runs'][path] = {'data': run_results['data'], 'summary': run_results['summary'],
                                 'seconds_to_accuracy': [r['seconds_to_accuracy'] for r in run_results['runs']]}
    with cli.run_folder(args, SCRIPT, argv, resumable=False) as run_dir:
        if curves:
            names = sorted({r['data'] for r in runs.values()})
            plot_time_to_accuracy(os.path.join(run_dir, 'time_to_accuracy.png'), curves, TARGETS,
                                  title=', '.join(names))
        cli.write_json(os.path.join(run_dir, 'results.json'), results)
    print(f"wrote {run_dir}")


if __name__ == '__main__':
    cli.run(main)
