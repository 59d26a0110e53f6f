"""Training speed of the lab's CIFAR-10 model and of train_cifar_fast.py's FastNet, and time-to-accuracy curves.

    python bench_cifar.py                                         # img/s of both models, side by side
    python bench_cifar.py runs/fast-seed0 runs/fast-seed1         # ... and their curves in one figure
    python bench_cifar.py --train 120 --data-dir data             # ... after a 2-minute train_cifar_fast.py run

Speed: full training steps (forward, backward, SGD update; FastNet's with its batched augmentation) on random
images, on the CPU or the GPU, each model as its script trains it: the lab's ConvNet with mini-batches of 50
in float32, FastNet with --batch-size in channels_last, in float32 and under bfloat16 autocast. The models
take turns, round after round, and the median round is reported, so that other work on a shared machine
slows them alike; a ratio measured here is meaningful, an absolute number only on an idle machine.
FLOPs per image are counted by torch.utils.flop_counter (training step = forward + backward).

Writes into <save-dir>/<run-name>/: results.json (speeds, FLOPs, the runs' final accuracies and times to
85/90/94%) and, given runs, time_to_accuracy.png (test accuracy against training seconds).
"""
import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

import cli
from train_cifar import ConvNet
from train_cifar_fast import FastNet, augment, plot_time_to_accuracy


def make_parser():
    parser = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_common_args(parser)
    parser.add_argument('runs', nargs='*', help="train_cifar_fast.py run folders (or their results.json) to plot")
    parser.add_argument('--device', choices=['auto', 'cpu', 'cuda'], default='auto', help='(default: auto)')
    parser.add_argument('--widths', default='64,128,256', help="FastNet's widths (default: 64,128,256)")
    parser.add_argument('--batch-size', type=cli.positive_int, default=512, help="FastNet's batch (default: 512)")
    parser.add_argument('--rounds', type=cli.positive_int, default=3, help='rounds of turns (default: 3)')
    parser.add_argument('--images', type=cli.positive_int, default=2048,
                        help='training images per model per round (default: 2048)')
    parser.add_argument('--threads', type=cli.positive_int, default=None, help='CPU threads (default: all available)')
    parser.add_argument('--train', type=cli.positive_float, default=None, metavar='SECONDS',
                        help='first run train_cifar_fast.py with --time-budget SECONDS (needs --data-dir) and plot it too')
    return parser


def training_step(model, batch_size, device, autocast_dtype=None, channels_last=False, augmented=False):
    """One SGD step on random images, as a closure; the model's own training recipe as far as speed goes."""
    model = model.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, nesterov=True)
    x = torch.randn(batch_size, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch_size,), device=device)
    generator = torch.Generator(device=device).manual_seed(0)

    def step():
        images = augment(x, generator) if augmented else x
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss = F.cross_entropy(model(images), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def flops_per_image(model, device):
    x = torch.randn(2, 3, 32, 32, device=device)
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model.to(device)(x), torch.zeros(2, dtype=torch.long, device=device)).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / 2


def measure_speeds(args, device):
    widths = tuple(int(w) for w in args.widths.split(','))
    candidates = {
        'lab ConvNet, batch 50, float32': (ConvNet(), 50, None, False, False),
        f'FastNet {args.widths}, batch {args.batch_size}, float32, channels_last':
            (FastNet(widths), args.batch_size, None, True, True),
        f'FastNet {args.widths}, batch {args.batch_size}, bfloat16 autocast, channels_last':
            (FastNet(widths), args.batch_size, torch.bfloat16, True, True),
    }
    flops = {name: flops_per_image(spec[0], device) for name, spec in candidates.items()}
    steps = {name: training_step(*spec[:2], device, *spec[2:]) for name, spec in candidates.items()}
    batch = {name: spec[1] for name, spec in candidates.items()}
    for step in steps.values():  # warm-up: one-time allocations and kernel choices
        step()
        step()
    speeds = {name: [] for name in steps}
    for _ in tqdm(range(args.rounds), desc='rounds', leave=False):
        for name, step in steps.items():
            count = max(1, args.images // batch[name])
            if device.type == 'cuda':
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(count):
                step()
            if device.type == 'cuda':
                torch.cuda.synchronize()
            speeds[name].append(count * batch[name] / (time.perf_counter() - start))
    return {name: {'images_per_second': float(np.median(s)), 'all_rounds': s, 'batch_size': batch[name],
                   'training_gflops_per_image': flops[name] / 1e9,
                   'achieved_gflops_per_second': flops[name] * float(np.median(s)) / 1e9}
            for name, s in speeds.items()}


def read_run(path):
    path = os.path.join(path, 'results.json') if os.path.isdir(path) else path
    try:
        with open(path) as f:
            results = json.load(f)
        return results if results.get('script') == 'train_cifar_fast.py' else None
    except (OSError, ValueError):
        return None


def main():
    args = make_parser().parse_args()
    runs = {path: read_run(path) for path in args.runs}
    bad = [path for path, results in runs.items() if results is None]
    if bad:
        raise cli.UserError(f"not a train_cifar_fast.py run folder or results.json: {', '.join(bad)}")
    device = cli.torch_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    cli.seed_everything(args.seed)
    run_dir = cli.make_run_dir(args.save_dir, args.run_name, 'bench_cifar', args.overwrite)
    if args.train:
        trained = os.path.join(run_dir, 'train')
        subprocess.run([sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), 'train_cifar_fast.py'),
                        '--data-dir', args.data_dir, '--save-dir', run_dir, '--run-name', 'train', '--device',
                        device.type, '--time-budget', str(args.train), '--widths', args.widths,
                        '--batch-size', str(args.batch_size), '--seed', str(args.seed)], check=True)
        runs[trained] = read_run(trained)

    load_at_start = os.getloadavg()
    speeds = measure_speeds(args, device)
    print(f"training speed on {device} ({torch.get_num_threads()} threads; load average {load_at_start[0]:.2f} at start, "
          f"{os.getloadavg()[0]:.2f} at end; the models took turns, median of {args.rounds} rounds):")
    lab = speeds['lab ConvNet, batch 50, float32']['images_per_second']
    for name, s in speeds.items():
        print(f"  {name:<62} {s['images_per_second']:8.0f} img/s  {s['training_gflops_per_image']:6.3f} GFLOP/img  "
              f"{s['achieved_gflops_per_second']:6.1f} GFLOP/s  ({s['images_per_second'] / lab:.2f}x the lab model's img/s)")

    results = {'script': 'bench_cifar.py', 'config': vars(args), 'device': str(device), 'speeds': speeds,
               'load_average_at_start': load_at_start, 'load_average_at_end': os.getloadavg(), 'runs': {}}
    curves = {}
    for path, run_results in runs.items():
        label = os.path.basename(os.path.dirname(path) if path.endswith('.json') else os.path.normpath(path))
        for run in run_results['runs']:
            curves[f"{label} seed {run['seed']}"] = run['history']
            reached = ', '.join(f"{k} {'-' if v is None else f'{v:.0f} s'}" for k, v in run['seconds_to_accuracy'].items())
            print(f"{label} seed {run['seed']}: test accuracy {run['test_accuracy']:.2%} ({run_results['data']}) after "
                  f"{run['train_seconds']:.0f} s of training; time to {reached}")
        results['runs'][path] = {'data': run_results['data'], 'summary': run_results['summary'],
                                 'seconds_to_accuracy': [r['seconds_to_accuracy'] for r in run_results['runs']]}
    if curves:
        names = sorted({r['data'] for r in runs.values()})
        plot_time_to_accuracy(os.path.join(run_dir, 'time_to_accuracy.png'), curves, title=', '.join(names))
    cli.write_json(os.path.join(run_dir, 'results.json'), results)
    print(f"wrote {run_dir}")


if __name__ == '__main__':
    cli.run(main)
