"""Runs a training script so that it pauses in the middle of an epoch, for tests/test_resume.py:

    python tests/pause_runner.py EPOCH:STEP[:NTH] script.py [flags...]

When the NTH training loop of the process (default: the first) has done STEP steps of epoch EPOCH, it
prints 'paused at ...' and waits (up to 10 minutes) until a signal asks the run to stop, so that a test
can stop it there. It wraps run.Run.steps from outside: the scripts carry no test hook.
"""
import os
import runpy
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import cli  # noqa: E402
import run  # noqa: E402


def main():
    where, script, *flags = sys.argv[1:]
    epoch, step, nth = ([int(part) for part in where.split(':')] + [1])[:3]
    steps_of_an_epoch = run.Run.steps
    hits = []

    def pausing_steps(self):
        steps = steps_of_an_epoch(self)
        while True:
            if self.epoch == epoch and self.step - (epoch - 1) * self.steps_per_epoch == step:
                hits.append(1)
                if len(hits) == nth:
                    print(f"paused at epoch {epoch}, step {step}", flush=True)
                    deadline = time.monotonic() + 600
                    while time.monotonic() < deadline and not cli.stop_requested():
                        time.sleep(0.05)
            try:
                i = next(steps)  # the run checks for a stop request first, as between any two steps
            except StopIteration:
                return
            yield i

    run.Run.steps = pausing_steps
    sys.argv = [os.path.join(ROOT, script), *flags]
    runpy.run_path(sys.argv[0], run_name='__main__')


if __name__ == '__main__':
    main()
