"""Runs a training script so that it pauses at a chosen moment, for the signal tests:

    python tests/pause_runner.py EPOCH:STEP[:NTH] script.py [flags...]     # in the middle of an epoch
    python tests/pause_runner.py at:MODULE.FUNCTION[:NTH] script.py [...]  # when FUNCTION is called the NTH time

When the NTH training loop of the process (default: the first) has done STEP steps of epoch EPOCH, or when
the function is called for the NTH time, it prints 'paused at ...' and waits (up to 10 minutes) until a signal
asks the run to stop (or, outside a run folder, stops it), then goes on as it would have. It wraps run.Run.steps
or the function from outside: the scripts carry no test hook.
"""
import functools
import importlib
import os
import runpy
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import cli  # noqa: E402
import run  # noqa: E402


def wait_for_a_signal(where):
    print(f"paused at {where}", flush=True)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and not cli.stop_requested():
        time.sleep(0.05)


def pause_in_an_epoch(epoch, step, nth):
    steps_of_an_epoch, hits = run.Run.steps, []

    def pausing_steps(self):
        steps = steps_of_an_epoch(self)
        while True:
            if self.epoch == epoch and self.step - (epoch - 1) * self.steps_per_epoch == step:
                hits.append(1)
                if len(hits) == nth:
                    wait_for_a_signal(f"epoch {epoch}, step {step}")
            try:
                i = next(steps)  # the run checks for a stop request first, as between any two steps
            except StopIteration:
                return
            yield i
    run.Run.steps = pausing_steps


def pause_in_a_call(name, nth):
    module_name, function_name = name.rsplit('.', 1)
    module = importlib.import_module(module_name)
    function, calls = getattr(module, function_name), []

    @functools.wraps(function)
    def pausing(*args, **kwargs):
        calls.append(1)
        if len(calls) == nth:
            wait_for_a_signal(name)
        return function(*args, **kwargs)
    setattr(module, function_name, pausing)


def main():
    where, script, *flags = sys.argv[1:]
    if where.startswith('at:'):
        name, nth = (where[3:].split(':') + ['1'])[:2]
        pause_in_a_call(name, int(nth))
    else:
        epoch, step, nth = ([int(part) for part in where.split(':')] + [1])[:3]
        pause_in_an_epoch(epoch, step, nth)
    sys.argv = [os.path.join(ROOT, script), *flags]
    runpy.run_path(sys.argv[0], run_name='__main__')


if __name__ == '__main__':
    main()
