"""Speed of one training step of the lab's MNIST net: this NumPy framework (float32 and float64) vs PyTorch on the CPU.

A step is forward + loss + backward + SGD update on one batch of random images
(speed does not depend on the pixel values). The three contenders run in one
process, interleaved round by round, so a neighbour that loads the machine
slows all of them alike; the medians and ratios are what to compare. --threads
sets OpenBLAS's and PyTorch's threads; the Cython kernels always run on one
(see THREADS in im2col_cython.pyx). A load average above the number of cores
means other programs compete for the CPU, and multi-threaded timings suffer most.

    python bench_layers.py                 # 30 rounds, all cores
    python bench_layers.py --threads 1     # one core for OpenBLAS and for PyTorch
"""
import os

# OpenBLAS's idle worker threads busy-wait 2**28 cycles (~0.1 s) after each BLAS call before they
# sleep. A training step calls BLAS every millisecond, so they never sleep and hold a core that
# the other contender (and the Cython kernels) then lack: PyTorch's step took ~30x longer next to
# them on a loaded 2-core machine. 2**4 cycles lets them sleep at once. OpenBLAS reads this when
# NumPy loads it, so it is set before the import; an explicit setting in the environment wins.
os.environ.setdefault('OPENBLAS_THREAD_TIMEOUT', '4')

import ctypes  # noqa: E402
import glob  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

import cli  # noqa: E402
import nn  # noqa: E402


def parse_args():
    parser = cli.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--steps', type=cli.positive_int, default=30,
                        help='timed steps of each contender (default: 30)')
    parser.add_argument('--warmup', type=cli.positive_int, default=3, help='untimed steps first (default: 3)')
    parser.add_argument('--batch-size', type=cli.positive_int, default=50, help='(default: 50, the lab\'s)')
    parser.add_argument('--threads', type=cli.positive_int, default=torch.get_num_threads(),
                        help=f'threads of OpenBLAS and of PyTorch (default: {torch.get_num_threads()}, '
                             'PyTorch\'s default)')
    parser.add_argument('--seed', type=int, default=42, help='random seed (default: 42)')
    return parser.parse_args()


def set_openblas_threads(num_threads):
    """Sets the thread count of NumPy's bundled OpenBLAS, as threadpoolctl would; False where it is not found."""
    for path in glob.glob(os.path.join(os.path.dirname(np.__file__), os.pardir, 'numpy.libs', '*openblas*')):
        library = ctypes.CDLL(path)
        for name in ('scipy_openblas_set_num_threads64_', 'openblas_set_num_threads64_', 'openblas_set_num_threads'):
            if hasattr(library, name):
                getattr(library, name)(num_threads)
                return True
    return False


def numpy_step(dtype, batch_size, rng):
    net, loss = nn.lab_mnist_net(batch_size, dtype)
    x = rng.standard_normal((batch_size, 1, 28, 28)).astype(dtype)
    y = rng.integers(0, 10, batch_size)

    def step():
        logits = nn.forward_pass(net, x)
        loss.forward(logits, y)
        grads = nn.backward_pass(net, loss, logits, y)
        nn.sgd_update_params(grads, {'lr': 1e-3})
    return step


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
    if not set_openblas_threads(args.threads):
        print("note: NumPy's BLAS is not OpenBLAS here; it runs with its default thread count")
    rng = np.random.default_rng(args.seed)
    steps = {'numpy float32': numpy_step(np.float32, args.batch_size, rng),
             'numpy float64': numpy_step(np.float64, args.batch_size, rng),
             'torch float32': torch_step(args.batch_size, rng)}
    times = {name: [] for name in steps}
    for _ in range(args.warmup):
        for step in steps.values():
            step()
    for _ in range(args.steps):  # round robin: a busy neighbour slows every contender alike
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)

    print(f"lab MNIST net, batch {args.batch_size}, {args.threads} thread(s), {args.steps} steps each "
          f"(forward + backward + SGD), {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")
    print(f"{'':15s} {'median ms/step':>15s} {'min ms/step':>12s} {'img/s':>8s}")
    for name, seconds in times.items():
        median = np.median(seconds)
        print(f"{name:15s} {1e3 * median:15.1f} {1e3 * min(seconds):12.1f} {args.batch_size / median:8.0f}")
    for name in ('numpy float32', 'numpy float64'):
        print(f"{name} / torch float32: {np.median(times[name]) / np.median(times['torch float32']):.2f} (medians), "
              f"{min(times[name]) / min(times['torch float32']):.2f} (minima)")


if __name__ == '__main__':
    cli.run(main)
