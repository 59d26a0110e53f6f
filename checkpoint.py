"""Checkpoints: what a run needs to go on exactly where it stopped, written atomically, read without pickle.

A training loop writes into its run folder, before the first epoch, after every epoch, and when Ctrl-C or
SIGTERM stops it between two steps (cli.stop_between_steps):
    checkpoint.npz  (NumPy framework)  np.load(..., allow_pickle=False): the parameters under nn.parameters'
                    keys, 'epoch' (epochs finished), 'batches_done' (steps done of the next epoch), 'step'
                    (steps in all), 'rng' (the shuffling generator's state at the start of the next epoch,
                    pcg64_state), 'epoch_seconds' and 'running_loss' (of the next epoch so far) and 'results'
                    (the results so far, as JSON text)
    checkpoint.pt   (PyTorch)  torch.load(..., weights_only=True): the same, with the model's, optimizer's and
                    scheduler's state_dicts; 'generator' is the batch order's generator at the start of the
                    next epoch, 'torch_rng' torch's global RNG now
A resumed run draws the interrupted epoch's permutation again from the saved generator state, skips the
batches done, and ends with the same weights as an uninterrupted one, bit for bit.
"""
import itertools
import json
import os
import time
import zipfile

import numpy as np
from tqdm import tqdm

import cli

NPZ, PT = 'checkpoint.npz', 'checkpoint.pt'


def _unreadable(path, error):
    return cli.UserError(f"{path}: not a readable checkpoint ({type(error).__name__}: {error}); "
                         f"start the run again with --overwrite")


def save_npz(path, arrays):
    cli.atomic_write(path, lambda f: np.savez(f, **arrays))


def load_npz(path):
    """{name: array} of an .npz, never unpickling anything; a UserError naming the file if it is unreadable."""
    try:
        with np.load(path, allow_pickle=False) as saved:
            return {key: saved[key] for key in saved.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise _unreadable(path, error)


def save_torch(path, state):
    import torch
    cli.atomic_write(path, lambda f: torch.save(state, f))


def load_torch(path):
    """A checkpoint.pt (or best_model.pt) on the CPU; weights_only=True builds nothing but tensors and plain values."""
    import torch
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as error:  # truncated zip, foreign pickle, refused global: all mean 'not ours'
        raise _unreadable(path, error)


def restore_torch(state, model, optimizer, scheduler, generator):
    """Puts a checkpoint.pt's training state back: weights, optimizer, scheduler and both RNGs."""
    import torch
    model.load_state_dict(state['model'])
    optimizer.load_state_dict(state['optimizer'])
    scheduler.load_state_dict(state['scheduler'])
    generator.set_state(state['generator'])
    torch.set_rng_state(state['torch_rng'])


def torch_epoch(loader, generator, epoch, desc, save, resumed=None):
    """One epoch of a PyTorch training loop over `loader`, whose sampler draws its order from `generator`:
    returns (progress bar, iterator of (step index, batch)). Before each step it checks for a stop (see
    steps); save(steps done, the generator's state at the start of the epoch) then writes the checkpoint.

    resumed: the checkpoint.pt of a run stopped in this epoch (restore_torch done), or None. Its
    generator state is the epoch's start, so the permutation is the one the batches done came from, and
    those are left out. Making the iterator draws a seed from torch's global RNG, which is why that RNG
    is put back after it."""
    import torch
    epoch_generator = generator.get_state()
    batches, first = iter(loader), resumed['batches_done'] if resumed else 0
    if first:
        torch.set_rng_state(resumed['torch_rng'])
        batches = itertools.islice(batches, first, None)
    progress = tqdm(range(first, len(loader)), initial=first, total=len(loader), desc=desc, leave=False)
    return progress, zip(steps(progress, epoch, lambda steps_done: save(steps_done, epoch_generator)), batches)


def steps(progress, epoch, save):
    """Yields the step indices of a tqdm bar over range(first step, steps per epoch) of `epoch`.
    Before each step it checks whether Ctrl-C or SIGTERM asked the loop to stop (cli.stop_between_steps);
    if so it calls save(steps done), says so and stops the program."""
    for i in progress:
        pause_for_tests(epoch, i + 1)
        if cli.stop_requested():
            save(i)
            progress.close()
            print(f"saved the run after {i} of the {progress.total} steps of epoch {epoch}")
            cli.stop()
        yield i


def resuming(run_dir, epochs_done, epochs, batches_done, steps_per_epoch):
    """The line a resumed run prints."""
    return f"resuming {run_dir} after epoch {epochs_done} of {epochs}" + (
        f" and {batches_done} of the {steps_per_epoch} steps of epoch {epochs_done + 1}" if batches_done else '')


def results_text(results):
    """The results dict as JSON text (NumPy scalars and arrays become numbers and lists), for a checkpoint."""
    return json.dumps(results, default=cli._json_default)


def pcg64_state(rng):
    """A np.random.Generator(PCG64)'s state as uint64 (6,): its 128-bit state and increment in 64-bit halves,
    and the buffered 32-bit draw (has_uint32, uinteger)."""
    state = rng.bit_generator.state
    if state['bit_generator'] != 'PCG64':
        raise ValueError(f"expected a PCG64 generator, got {state['bit_generator']}")
    mask = (1 << 64) - 1
    value, inc = state['state']['state'], state['state']['inc']
    return np.array([value >> 64, value & mask, inc >> 64, inc & mask, state['has_uint32'], state['uinteger']],
                    dtype=np.uint64)


def set_pcg64_state(rng, array):
    """Inverse of pcg64_state."""
    hi, lo, inc_hi, inc_lo, has_uint32, uinteger = (int(x) for x in array)
    rng.bit_generator.state = {'bit_generator': 'PCG64',
                               'state': {'state': hi << 64 | lo, 'inc': inc_hi << 64 | inc_lo},
                               'has_uint32': has_uint32, 'uinteger': uinteger}


def finished_results(run_dir, final_key):
    """results.json of run_dir if the run finished (it holds final_key, written only at the end), else None."""
    try:
        with open(os.path.join(run_dir, 'results.json')) as f:
            results = json.load(f)
    except (OSError, ValueError):
        return None
    return results if isinstance(results, dict) and final_key in results else None


# A test hook: LAB2_PAUSE_AT=EPOCH:STEP[:NTH] makes the NTH (default 1st) training loop of the process that
# reaches that step (1-based, within the epoch) print a line and wait (up to 10 minutes, or until a signal
# asks the loop to stop), so that a test can stop it mid-epoch.
_PAUSE_AT = [int(part) for part in os.environ.get('LAB2_PAUSE_AT', '').split(':') if part]
_pause_hits = 0


def pause_for_tests(epoch, step):
    global _pause_hits
    if _PAUSE_AT and (epoch, step) == tuple(_PAUSE_AT[:2]):
        _pause_hits += 1
        if _pause_hits == (_PAUSE_AT[2:] or [1])[0]:
            print(f"paused at epoch {epoch}, step {step} (LAB2_PAUSE_AT)", flush=True)
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline and not cli.stop_requested():
                time.sleep(0.05)
