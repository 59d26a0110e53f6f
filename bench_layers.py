"""Speed of one training step of the lab's MNIST net: the NumPy framework (fast and textbook layers) vs PyTorch on the CPU.

A step is forward + loss + backward + SGD update on one batch of random images
(speed does not depend on the pixel values). The contenders run in one
process, interleaved round by round, at each thread count in turn, so a
neighbour that loads the machine slows all of them alike; the medians and
ratios are what to compare. Each timed step follows an untimed step of the
same contender, as in a training loop: PyTorch's OpenMP workers spin on their
cores for ~10 ms after every operation, and took that from a NumPy step that
started right after a PyTorch one; after a pause instead, waking the idle
cores made two-thread steps ~1.5x slower. --threads lists the thread counts:
at each, the fast layers split their heavy work between that many threads
(fast_layers.set_num_threads, with OpenBLAS single-threaded inside), PyTorch
runs that many, and the textbook layers run on that many OpenBLAS threads. A
load average above the number of cores means other programs compete for the
CPU, and multi-threaded timings suffer most (PyTorch's the most: its threads
wait for each other at every operation). --profile adds the time of every
layer's forward and backward in the fast float32 net, and of the loss and the
update: where each millisecond of its step goes.

    python bench_layers.py                   # 30 rounds, 1 thread and all cores
    python bench_layers.py --threads 2       # two threads only

Writes <save-dir>/<run-name>/results.json: every contender's step times, the profile, and the machine.
"""
import argparse
import os
import time

# Before torch starts its OpenMP threads: idle ones sleep instead of spinning. Spinning, they wait for each
# other whenever anything else runs on the machine, and a training step takes many times longer (README).
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')

import numpy as np
import torch

import cli
import fast_layers
import layers
import nn
import summary
import train

CONTENDERS = ('fast float32', 'fast float64', 'textbook float32', 'torch float32')


def make_parser():
    parser = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_flags(parser, 'save_dir', 'run_name', 'overwrite', 'seed')
    parser.add_argument('--steps', type=cli.positive_int, default=30,
                        help='timed steps of each contender at each thread count (default: 30)')
    parser.add_argument('--warmup', type=cli.positive_int, default=3, help='untimed steps first (default: 3)')
    parser.add_argument('--batch-size', type=cli.positive_int, default=50, help='(default: 50, the lab\'s)')
    all_cores = torch.get_num_threads()
    parser.add_argument('--threads', type=cli.positive_int, nargs='+', default=sorted({1, all_cores}),
                        help=f'thread counts of the layers and of PyTorch, each measured in turn '
                             f'(default: {" ".join(map(str, sorted({1, all_cores})))}: one, and PyTorch\'s default)')
    parser.add_argument('--profile', action='store_true',
                        help='also time every layer, the loss and the update of the fast float32 net')
    return parser


def numpy_step(module, dtype, batch_size, rng, profile=None):
    """One training step of the NumPy net made of `module`'s layers. With profile (a dict), every layer's
    forward and backward, the loss and the update append their seconds to profile[name]."""
    net, loss = train.make_net(module, batch_size, dtype), module.SoftmaxCrossEntropyWithLogits()
    x = rng.standard_normal((batch_size, 1, 28, 28)).astype(dtype)
    y = rng.integers(0, 10, batch_size)
    update = nn.sgd_update_params
    if profile is not None:
        for part in net + [loss]:
            for method in ('forward', 'backward_inputs', 'backward_params'):
                if hasattr(part, method):
                    name = getattr(part, 'name', 'loss')
                    setattr(part, method, timed(getattr(part, method), f'{name}.{method}', profile))
        update = timed(update, 'SGD update', profile)

    def step():
        logits = nn.forward_pass(net, x)
        loss.forward(logits, y)
        grads = nn.backward_pass(net, loss, logits, y)
        update(grads, {'lr': 1e-3})
    return step


def timed(function, key, profile):
    def wrapper(*args):
        start = time.perf_counter()
        result = function(*args)
        profile.setdefault(key, []).append(time.perf_counter() - start)
        return result
    return wrapper


def torch_step(batch_size, rng):
    """The same net in PyTorch (float32), with PyTorch's own conv/pool kernels."""
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 16, 5, padding=2), torch.nn.MaxPool2d(2), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 32, 5, padding=2), torch.nn.MaxPool2d(2), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Linear(1568, 512), torch.nn.ReLU(), torch.nn.Linear(512, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.from_numpy(rng.standard_normal((batch_size, 1, 28, 28)).astype(np.float32))
    y = torch.from_numpy(rng.integers(0, 10, batch_size))

    def step():
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return step


def use_threads(threads):
    torch.set_num_threads(threads)
    fast_layers.set_num_threads(threads)
    fast_layers.set_blas_threads(threads)   # the textbook layers' products; the fast layers set 1 inside


def parse_args(argv=None):
    """The flags, weighed against the machine before any work: every thread count at most its CPUs, and the
    memory of the nets it builds (four per thread count, each keeping what the textbook layers keep per image)."""
    args = make_parser().parse_args(argv)
    cli.check_threads(max(args.threads))
    per_image = summary.memory(summary.model_summary(train.make_net(layers, 1, np.float64), 1))['kept_bytes']['float64']
    cli.check_memory(f"--batch-size {args.batch_size} at {len(set(args.threads))} thread count(s)",
                     3 * 4 * len(set(args.threads)) * args.batch_size * per_image)
    return args


def main(argv=None):
    args = parse_args(argv)
    cli.seed_everything(args.seed)
    if not fast_layers.set_blas_threads(1):
        print("note: NumPy's BLAS is not a bundled OpenBLAS here; it runs with its default thread count")
    rng = np.random.default_rng(args.seed)
    args.threads = sorted(set(args.threads))
    profiles = {threads: {} for threads in args.threads} if args.profile else None
    # One net per thread count: the profile of each is its own.
    steps = {threads: {'fast float32': numpy_step(fast_layers, np.float32, args.batch_size, rng,
                                                  None if profiles is None else profiles[threads]),
                       'fast float64': numpy_step(fast_layers, np.float64, args.batch_size, rng),
                       'textbook float32': numpy_step(layers, np.float32, args.batch_size, rng),
                       'torch float32': torch_step(args.batch_size, rng)}
             for threads in args.threads}
    times = {threads: {name: [] for name in CONTENDERS} for threads in args.threads}
    load_before = os.getloadavg()[0]
    for threads in args.threads:
        use_threads(threads)
        for _ in range(args.warmup):
            for step in steps[threads].values():
                step()
    for profile in (profiles or {}).values():
        profile.clear()
    for _ in range(args.steps):  # round robin: a busy neighbour slows every contender alike
        for threads in args.threads:
            use_threads(threads)
            for name, step in steps[threads].items():
                step()   # untimed: this contender's threads are awake, the previous one's are idle
                start = time.perf_counter()
                step()
                times[threads][name].append(time.perf_counter() - start)

    kernels = fast_layers.fast_kernels
    build = 'not built' if kernels is None else 'AVX2 + FMA build' if kernels.AVX2 else 'plain build'
    print(f"lab MNIST net, batch {args.batch_size}, {args.steps} steps of each contender at each thread count "
          f"(forward + backward + SGD), {os.cpu_count()} cores, load average {load_before:.1f} before, "
          f"{os.getloadavg()[0]:.1f} after; fast kernels: {build}")
    print(f"{'threads':>7s}  {'':17s} {'median ms/step':>15s} {'min ms/step':>12s} {'img/s':>8s} "
          f"{'/ torch (medians)':>18s}")
    for threads in args.threads:
        torch_median = np.median(times[threads]['torch float32'])
        for name, seconds in times[threads].items():
            median = np.median(seconds)
            print(f"{threads:7d}  {name:17s} {1e3 * median:15.1f} {1e3 * min(seconds):12.1f} "
                  f"{args.batch_size / median:8.0f} {median / torch_median:18.2f}")
    for threads in args.threads:
        for name in CONTENDERS[:-1]:
            ours, torch_times = times[threads][name], times[threads]['torch float32']
            print(f"{name} / torch float32, {threads} thread(s): {np.median(ours) / np.median(torch_times):.2f} "
                  f"(medians), {min(ours) / min(torch_times):.2f} (minima)")
    with cli.run_folder(args, 'bench_layers', argv, resumable=False) as run_dir:
        cli.write_json(os.path.join(run_dir, 'results.json'), {
            'script': 'bench_layers.py', 'config': vars(args), 'machine': cli.machine(), 'fast_kernels': build,
            'load_average_before': load_before, 'seconds_per_step': times, 'profile': profiles})
    for threads, profile in (profiles or {}).items():
        # Minima too: on a loaded machine the medians of short calls mostly measure the neighbours.
        print(f"fast float32, {threads} thread(s): where the step goes   median ms     min ms")
        for key, seconds in profile.items():
            print(f"  {key:28s} {1e3 * np.median(seconds):27.2f} {1e3 * min(seconds):10.2f}")
        step = times[threads]['fast float32']
        print(f"  {'sum':28s} {1e3 * sum(np.median(s) for s in profile.values()):27.2f} "
              f"{1e3 * sum(min(s) for s in profile.values()):10.2f}")
        print(f"  {'the whole step':28s} {1e3 * np.median(step):27.2f} {1e3 * min(step):10.2f}   "
              f"(the rest: nn.py's loops)")


if __name__ == '__main__':
    cli.run(main)
