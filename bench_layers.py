"""Speed of one training step of the lab's MNIST net: the NumPy framework (fast and textbook layers) vs PyTorch on the CPU.

A step is forward + loss + backward + SGD update on one batch of random images
(speed does not depend on the pixel values). The three contenders run in one
process, interleaved round by round, so a neighbour that loads the machine
slows all of them alike; the medians and ratios are what to compare. Each
timed step follows an untimed step of the same contender, as in a training
loop: PyTorch's OpenMP workers spin on their cores for ~10 ms after every
operation, and took that from a NumPy step that started right after a PyTorch
one; after a pause instead, waking the idle cores made two-thread steps ~1.5x
slower. --threads sets the fast layers' threads (fast_layers.set_num_threads:
each heavy layer splits its work between them, with OpenBLAS single-threaded
inside) and PyTorch's; the textbook layers run on OpenBLAS's own threads. A load average above the number of cores means other
programs compete for the CPU, and multi-threaded timings suffer most (PyTorch's
the most: its threads wait for each other at every operation). --profile adds
the time of every layer's forward and backward in the fast float32 net.

    python bench_layers.py                 # 30 rounds, all cores
    python bench_layers.py --threads 1     # one core for the layers and for PyTorch
"""
import os
import time

import numpy as np
import torch

import cli
import fast_layers
import layers
import nn
import train


def parse_args():
    parser = cli.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--steps', type=cli.positive_int, default=30,
                        help='timed steps of each contender (default: 30)')
    parser.add_argument('--warmup', type=cli.positive_int, default=3, help='untimed steps first (default: 3)')
    parser.add_argument('--batch-size', type=cli.positive_int, default=50, help='(default: 50, the lab\'s)')
    parser.add_argument('--threads', type=cli.positive_int, default=torch.get_num_threads(),
                        help=f'threads of the layers and of PyTorch (default: {torch.get_num_threads()}, '
                             'PyTorch\'s default)')
    parser.add_argument('--profile', action='store_true', help='also time every layer of the fast float32 net')
    parser.add_argument('--seed', type=int, default=42, help='random seed (default: 42)')
    return parser.parse_args()


def numpy_step(module, dtype, batch_size, rng, layer_times=None):
    """One training step of the NumPy net made of `module`'s layers; with layer_times (a dict), each layer's
    share is added there."""
    net, loss = train.make_net(module, batch_size, dtype), module.SoftmaxCrossEntropyWithLogits()
    x = rng.standard_normal((batch_size, 1, 28, 28)).astype(dtype)
    y = rng.integers(0, 10, batch_size)
    if layer_times is not None:
        for layer in net:
            for method in ('forward', 'backward_inputs', 'backward_params'):
                if hasattr(layer, method):
                    setattr(layer, method, timed(getattr(layer, method), f'{layer.name}.{method}', layer_times))

    def step():
        logits = nn.forward_pass(net, x)
        loss.forward(logits, y)
        grads = nn.backward_pass(net, loss, logits, y)
        nn.sgd_update_params(grads, {'lr': 1e-3})
    return step


def timed(method, key, layer_times):
    def wrapper(*args):
        start = time.perf_counter()
        result = method(*args)
        layer_times.setdefault(key, []).append(time.perf_counter() - start)
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


def main():
    args = parse_args()
    cli.seed_everything(args.seed)
    torch.set_num_threads(args.threads)
    fast_layers.set_num_threads(args.threads)
    if not fast_layers.set_blas_threads(args.threads):
        print("note: NumPy's BLAS is not a bundled OpenBLAS here; it runs with its default thread count")
    rng = np.random.default_rng(args.seed)
    layer_times = {} if args.profile else None
    steps = {'fast float32': numpy_step(fast_layers, np.float32, args.batch_size, rng, layer_times),
             'fast float64': numpy_step(fast_layers, np.float64, args.batch_size, rng),
             'textbook float32': numpy_step(layers, np.float32, args.batch_size, rng),
             'torch float32': torch_step(args.batch_size, rng)}
    times = {name: [] for name in steps}
    for _ in range(args.warmup):
        for step in steps.values():
            step()
    for times_of_layer in (layer_times or {}).values():
        times_of_layer.clear()
    for _ in range(args.steps):  # round robin: a busy neighbour slows every contender alike
        for name, step in steps.items():
            step()   # untimed: this contender's threads are awake, the previous one's are idle
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)

    print(f"lab MNIST net, batch {args.batch_size}, {args.threads} thread(s), {args.steps} steps each "
          f"(forward + backward + SGD), {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")
    print(f"{'':17s} {'median ms/step':>15s} {'min ms/step':>12s} {'img/s':>8s}")
    for name, seconds in times.items():
        median = np.median(seconds)
        print(f"{name:17s} {1e3 * median:15.1f} {1e3 * min(seconds):12.1f} {args.batch_size / median:8.0f}")
    if layer_times:
        print("fast float32, per layer (median ms):")
        for key, seconds in layer_times.items():
            print(f"  {key:28s} {1e3 * np.median(seconds):6.2f}")
        print(f"  {'sum':28s} {1e3 * sum(np.median(seconds) for seconds in layer_times.values()):6.2f}")
    for name in ('fast float32', 'fast float64', 'textbook float32'):
        print(f"{name} / torch float32: {np.median(times[name]) / np.median(times['torch float32']):.2f} (medians), "
              f"{min(times[name]) / min(times['torch float32']):.2f} (minima)")


if __name__ == '__main__':
    cli.run(main)
