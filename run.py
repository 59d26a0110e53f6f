"""A training run that can stop at any step and go on from its folder, bit for bit.

The training loops keep the lab's shape; a Run hands out the epochs and the steps still to do, and records
what the loop reports:

    run = Run(run_dir, seed, resume, epochs, len(train_x), batch_size, arrays=nn.parameters(net))
    for epoch in run.epochs():
        order = run.rng.permutation(len(train_x))        # the lab's shuffle: a new order every epoch
        for step in run.steps():                         # the steps of the epoch not done yet
            batch = order[step * batch_size:(step + 1) * batch_size]
            ...                                          # forward, loss, backward, update
            run.check_loss(loss)                         # NaN or infinite: the run stops before the update
        run.end_epoch(lr=lr, train=evaluate(...), valid=evaluate(...))   # prints, writes results and checkpoint
    run.finish(test=...)

What the Run does besides:
  - it writes the checkpoint before the first epoch and after every epoch: the weights (or the PyTorch
    state_dicts), where the run stands (epochs done, steps done of the next epoch), the state `rng` had at
    the start of that epoch, and the results so far (checkpoint.py writes and reads the files);
  - once Ctrl-C or SIGTERM asked the run to stop (cli.run_folder), steps() saves where it stands before the
    next step and stops: a signal between two weight updates would save the weights of no step at all;
  - with resume=True it reads the checkpoint back: the weights, the results, and rng as it was at the start
    of the interrupted epoch, so that the loop draws the same order and steps() leaves out the steps done.
    The run then ends with the same weights as one that was never stopped.
A checkpoint read back must look exactly like what this code writes (names, shapes, dtypes, types, finite
values, counts that fit together and fit the run's flags): anything else stops the run with one line naming
the file before anything in its folder changes. A run that diverges never overwrites its last good checkpoint.
"""
import json
import math
import os
import time

import numpy as np

import checkpoint
import cli
import readback


class Diverged(cli.UserError):
    """The loss became NaN or infinite: the run stops before that reaches the weights on disk."""


class Run:
    """Where a training run stands; see the module docstring.

    epochs, num_examples, batch_size: the run's length; an epoch has num_examples // batch_size steps (the
                 last partial batch is left out).
    arrays:      {name: array} of a NumPy net (nn.parameters), restored in place; or
    state_dicts: {name: object with state_dict() and load_state_dict()} (model, optimizer, scheduler).
    results:     what a new run's results.json starts with; 'epochs' (end_epoch's records) and 'machine'
                 (cli.machine()) are added.
    """

    def __init__(self, run_dir, seed, resume, epochs, num_examples, batch_size, arrays=None, state_dicts=None,
                 results=None):
        cli.check_batch_size(batch_size, num_examples, 'to train on')
        self.dir, self.num_epochs, self.batch_size = run_dir, epochs, batch_size
        self.steps_per_epoch = num_examples // batch_size
        self.arrays, self.state_dicts = arrays, state_dicts
        self.path = os.path.join(run_dir, checkpoint.NPZ if state_dicts is None else checkpoint.PT)
        self.rng = np.random.default_rng(seed)  # the training set's order; nothing else draws from it
        self.epochs_done, self.steps_done, self.step, self.epoch_seconds = 0, 0, 0, 0.0
        self.results = {**(results or {}), 'machine': cli.machine(), 'epochs': []}
        self.resumed = resume and os.path.exists(self.path)
        if self.resumed:
            self._restore()
            if self.finished:
                self._check_results_file()
            else:
                print(self._where('resuming'))
        self.epoch = self.epochs_done  # the epoch in progress, from epochs(); before it, the last one done

    @property
    def finished(self):
        """True once finish() was called: a resumed sweep reads such a run back instead of training it."""
        return 'finished' in self.results

    def epochs(self):
        """Yields the epoch numbers still to do, 1-based."""
        if not self.resumed:
            self._save()
        for self.epoch in range(self.epochs_done + 1, self.num_epochs + 1):
            self._epoch_rng = self.rng.bit_generator.state  # what a stop in this epoch saves
            self._epoch_start = time.perf_counter() - self.epoch_seconds
            yield self.epoch

    def steps(self):
        """Yields this epoch's step numbers still to do (0-based), counting run.step (over the whole run); a stop
        asked for by Ctrl-C or SIGTERM happens here, between two steps, after a checkpoint of where it stands."""
        self._progress = progress = cli.progress_bar(self.steps_per_epoch, initial=self.steps_done,
                                                     desc=f"epoch {self.epoch}/{self.num_epochs}")
        for i in range(self.steps_done, self.steps_per_epoch):
            if cli.stop_requested():
                progress.close()
                self._save_where_stopped(i)
                cli.stop()
            self.step += 1
            yield i
            progress.update()
        progress.close()
        self._train_seconds = time.perf_counter() - self._epoch_start

    def check_loss(self, loss):
        """Stops the run with Diverged if the batch loss is NaN or infinite; shows it in the progress bar."""
        loss = loss.item() if hasattr(loss, 'item') else float(loss)  # a tensor, a NumPy or a Python number
        if not math.isfinite(loss):
            raise Diverged(f"the loss became {loss} at epoch {self.epoch}, step {self.step}; lower the learning "
                           f"rate. The last checkpoint, after epoch {self.epochs_done}, is in {self.dir}")
        self._progress.set_postfix(loss=f'{loss:.4f}', refresh=False)

    def end_epoch(self, lr, train, valid, **extra):
        """Records the epoch: its learning rate, the scores of evaluate() on the training and validation sets
        (loss, accuracy, and macro precision and recall where they are given) and `extra` numbers (reg_loss);
        prints them and saves results.json and the checkpoint. A NaN or infinite score stops the run first, so
        results.json and the checkpoint keep the last good epoch. Call it before the epoch writes anything else."""
        record = {'epoch': self.epoch, 'lr': lr, **_scores_of('train', train), **_scores_of('valid', valid), **extra}
        for key, value in record.items():
            if not math.isfinite(value):
                raise Diverged(f"the {key.replace('_', ' ')} became {value} after epoch {self.epoch}; lower the "
                               f"learning rate. The last checkpoint, after epoch {self.epochs_done}, is in {self.dir}")
        record.update(seconds=self._train_seconds,
                      images_per_second=self.steps_per_epoch * self.batch_size / self._train_seconds)
        self.results['epochs'].append(record)
        self.epochs_done, self.steps_done, self.epoch_seconds = self.epoch, 0, 0.0
        print(format_epoch(record, self.num_epochs))
        cli.write_json(os.path.join(self.dir, 'results.json'), self.results)
        self._save()

    def finish(self, test, **extra):
        """Adds the test scores (metrics.summary's dict) and `extra` results; the run is done."""
        epochs = self.results['epochs']
        self.results.update(extra, test=test, finished=True,
                            seconds_per_epoch=float(np.mean([r['seconds'] for r in epochs])),
                            images_per_second=float(np.mean([r['images_per_second'] for r in epochs])))
        cli.write_json(os.path.join(self.dir, 'results.json'), self.results)
        self._save()

    # ------------------------------------------------------------------------- saving and restoring

    def _where(self, verb):
        return f"{verb} {self.dir} after epoch {self.epochs_done}" + (
            f" and {self.steps_done} steps of epoch {self.epochs_done + 1}" if self.steps_done else '')

    def _state(self):
        """What the checkpoint holds besides 'run': the arrays, or each object's state_dict()."""
        if self.state_dicts is None:
            return self.arrays
        return {name: obj.state_dict() for name, obj in self.state_dicts.items()}

    def _save(self, epoch_rng=None):
        """Writes the checkpoint; epoch_rng: rng's state at the start of the epoch in progress (default: now)."""
        fields = cli.json_text({'epochs_done': self.epochs_done, 'steps_done': self.steps_done, 'step': self.step,
                                'epoch_seconds': self.epoch_seconds, 'rng': epoch_rng or self.rng.bit_generator.state,
                                'results': self.results})  # a NaN test loss, say, becomes null
        if self.state_dicts is None:
            checkpoint.save_npz(self.path, {**self._state(), 'run': np.array(fields)})
        else:
            checkpoint.save_torch(self.path, {**self._state(), 'run': fields})

    def _save_where_stopped(self, steps_done):
        """The checkpoint of a run stopped before step `steps_done` of the epoch in progress. check_loss saw the
        last step's loss, not the weights its update made: if they overflowed, the last good checkpoint stays,
        and --resume will meet the divergence again and report it."""
        if checkpoint.all_finite(self._state()):
            self.steps_done, self.epoch_seconds = steps_done, time.perf_counter() - self._epoch_start
            self._save(self._epoch_rng)
            print(self._where('saved'))

    def _restore(self):
        """Reads the checkpoint back, checking each part against this run before anything is copied: the 'run'
        fields, then every array or state_dict against the run's own (names, shapes, dtypes, finite values)."""
        saved = checkpoint.load_npz(self.path) if self.state_dicts is None else checkpoint.load_torch(self.path)
        names = set(self.arrays if self.state_dicts is None else self.state_dicts) | {'run'}
        if not isinstance(saved, dict):
            raise checkpoint.unreadable(self.path, ValueError(f"a {type(saved).__name__}, not a dict"))
        missing, extra = sorted(names - set(saved)), sorted(map(str, set(saved) - names))
        if missing or extra:
            kind = 'array ' if self.state_dicts is None and missing != ['run'] else ''
            raise checkpoint.unreadable(self.path, ValueError(
                f"no {kind}{missing[0]!r}" if missing else f"it holds {extra[0][:40]!r} of its own"))
        fields = self._run_fields(saved['run'])
        if self.state_dicts is None:
            checkpoint.copy_arrays(self.arrays, saved, self.path)
        else:
            for name, obj in self.state_dicts.items():
                checkpoint.load_state_dict(obj, saved[name], self.path, name)
        try:
            self.rng.bit_generator.state = fields['rng']
        except (KeyError, ValueError, TypeError, OverflowError) as error:  # another generator's, or tampered
            raise checkpoint.unreadable(self.path, ValueError(f"'rng' is not a generator state ({error})"))
        for key in ('epochs_done', 'steps_done', 'step', 'epoch_seconds', 'results'):
            setattr(self, key, fields[key])

    def _check_results_file(self):
        """A finished run's results.json must be what finish() wrote: the checkpoint's results, to the bit."""
        path = os.path.join(self.dir, 'results.json')
        if readback.read_json(path, dict) != json.loads(cli.json_text(self.results)):
            raise readback.ReadBackError(f"{path}: not the results of this finished run (its checkpoint holds "
                                         f"others); start the run again with --overwrite")

    def _run_fields(self, text):
        """The 'run' JSON of a checkpoint, checked field by field against what this code writes and against
        the run's flags: a tampered file is one line naming it, not a traceback."""
        if isinstance(text, np.ndarray) and text.dtype.kind == 'U' and text.ndim == 0:
            text = str(text)  # how save_npz stores it
        try:
            fields = readback.parse_json(text, {
                'epochs_done': readback.COUNT, 'steps_done': readback.COUNT, 'step': readback.COUNT,
                'epoch_seconds': readback.Number(0), 'rng': dict,
                'results': {'epochs': [{'epoch': readback.COUNT, 'seconds': readback.Number(0)}]}}, 'run')
            done, steps, per_epoch = fields['epochs_done'], fields['steps_done'], self.steps_per_epoch
            if done > self.num_epochs or steps >= per_epoch or fields['step'] != done * per_epoch + steps \
                    or (done == self.num_epochs and steps):
                raise ValueError(f"step {fields['step']}, {steps} steps into epoch {done + 1}, does not fit a run "
                                 f"of {self.num_epochs} epochs of {per_epoch} steps")
            epochs = fields['results']['epochs']
            if [record['epoch'] for record in epochs] != list(range(1, done + 1)):
                raise ValueError(f"'results' has no record of each of the {done} epochs done")
            for record in epochs:  # what end_epoch records: finite numbers, read back by plots and summaries
                if not all(readback.Number().fits(value) for value in record.values()):
                    raise ValueError(f"an epoch's record is not a dict of finite numbers: {str(record)[:60]}")
        except (readback.ReadBackError, ValueError) as error:
            raise checkpoint.unreadable(self.path, ValueError(str(error).removeprefix('run: ')))
        return fields


def _scores_of(split, scores):
    """evaluate()'s scores of one split -> the record's numbers: <split>_loss, <split>_acc and, where evaluate
    gave them, <split>_precision and <split>_recall (macro averages)."""
    record = {f'{split}_loss': float(scores['loss']), f'{split}_acc': float(scores['accuracy'])}
    if 'macro_precision' in scores:
        record.update({f'{split}_precision': float(scores['macro_precision']),
                       f'{split}_recall': float(scores['macro_recall'])})
    return record


def format_epoch(record, epochs):
    """One line of an epoch's scores: loss and accuracy (and macro precision/recall, if recorded) per split."""
    parts = []
    for split in ('train', 'valid'):
        part = f"{split} loss {record[f'{split}_loss']:.4f} acc {record[f'{split}_acc']:.2%}"
        if f'{split}_precision' in record:
            part += f" P {record[f'{split}_precision']:.2%} R {record[f'{split}_recall']:.2%}"
        parts.append(part)
    if record.get('reg_loss'):
        parts.append(f"L2 term {record['reg_loss']:.4f}")
    parts.append(f"lr {record['lr']:g}")
    parts.append(f"{record['seconds']:.1f} s ({record['images_per_second']:.0f} img/s)")
    return f"epoch {record['epoch']}/{epochs}: " + ', '.join(parts)
