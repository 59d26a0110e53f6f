"""Checkpoints: what a run needs to go on exactly where it stopped, written atomically, read without pickle.

At the end of every epoch (and once before the first) a training loop writes into its run folder
    checkpoint.npz  (NumPy framework)  np.load(..., allow_pickle=False): the parameters under nn.parameters'
                    keys, 'epoch', 'step', 'rng' (the shuffling generator's state, pcg64_state) and
                    'results' (the results so far, as JSON text)
    checkpoint.pt   (PyTorch)  torch.load(..., weights_only=True): a dict of state_dicts, tensors (the RNG
                    states) and plain Python values, the results again as JSON text
Each holds the state at the end of its epoch, RNG states included, so a resumed run redoes the
interrupted epoch with the same batches and ends with the same weights as an uninterrupted one.
"""
import json
import os
import time
import zipfile

import numpy as np

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
# reaches that step (1-based, within the epoch) print a line and sleep, so that a test can kill it mid-epoch.
_PAUSE_AT = [int(part) for part in os.environ.get('LAB2_PAUSE_AT', '').split(':') if part]
_pause_hits = 0


def pause_for_tests(epoch, step):
    global _pause_hits
    if _PAUSE_AT and (epoch, step) == tuple(_PAUSE_AT[:2]):
        _pause_hits += 1
        if _pause_hits == (_PAUSE_AT[2:] or [1])[0]:
            print(f"paused at epoch {epoch}, step {step} (LAB2_PAUSE_AT)", flush=True)
            time.sleep(600)
