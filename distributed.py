"""This process's place among torchrun's processes: reading and checking torchrun's environment, joining
the process group without becoming deaf to Ctrl-C and SIGTERM, and the few collective operations
train_cifar_fast.py needs. Without torchrun it is a world of one process, and every operation is a no-op."""
import datetime
import os
import threading

import torch
import torch.distributed as dist

import cli

JOIN_TIMEOUT = datetime.timedelta(minutes=30)  # torch's default: how long to wait for the other processes


def _environment_int(name, default, lowest):
    text = os.environ.get(name)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < lowest:
        raise cli.UserError(f"environment variable {name}={text!r} is not an integer >= {lowest} "
                            "(torchrun sets it; unset it to run a single process)")
    return value


def _join_process_group(backend, world):
    """dist.init_process_group, waiting for the other processes in a helper thread: the wait happens in C++,
    where Python's signal handlers cannot run, so in this thread Ctrl-C and SIGTERM would be ignored until
    the rendezvous times out. Here they raise as usual, and the process exits without waiting."""
    for name in ('MASTER_ADDR', 'MASTER_PORT'):
        if not os.environ.get(name):
            raise cli.UserError(f"WORLD_SIZE is {world} but environment variable {name} is not set; start the "
                                "processes with python -m torch.distributed.run (torchrun), which sets it")
    _environment_int('MASTER_PORT', None, 1)
    failures = []

    def join():
        try:
            dist.init_process_group(backend, timeout=JOIN_TIMEOUT)
        except Exception as error:  # reported by the main thread
            failures.append(error)

    joiner = threading.Thread(target=join, name='join-process-group', daemon=True)
    joiner.start()
    while joiner.is_alive():
        joiner.join(0.2)
    if failures:
        reason = (str(failures[0]).strip() or type(failures[0]).__name__).splitlines()[0]
        raise cli.UserError(f"could not join the other {world - 1} process(es) at "
                            f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}: {reason}")


class Distributed:
    """This process's place among the torchrun processes (world 1 without torchrun)."""

    def __init__(self, device):
        self.world = _environment_int('WORLD_SIZE', 1, 1)
        self.rank = _environment_int('RANK', 0, 0)
        self.local_rank = _environment_int('LOCAL_RANK', 0, 0)
        self.local_world = _environment_int('LOCAL_WORLD_SIZE', 1, 1)
        if self.rank >= self.world or self.local_rank >= self.local_world:
            raise cli.UserError(f"RANK {self.rank} / LOCAL_RANK {self.local_rank} do not fit in WORLD_SIZE "
                                f"{self.world} / LOCAL_WORLD_SIZE {self.local_world}")
        self.device = device
        if device.type == 'cuda':  # one GPU per process, chosen before NCCL starts
            if self.local_rank >= torch.cuda.device_count():
                raise cli.UserError(f"LOCAL_RANK {self.local_rank} has no GPU: this machine has "
                                    f"{torch.cuda.device_count()}")
            self.device = torch.device('cuda', self.local_rank)
            torch.cuda.set_device(self.device)
        if self.world > 1:
            _join_process_group('nccl' if device.type == 'cuda' else 'gloo', self.world)

    @property
    def main(self):
        return self.rank == 0

    def broadcast_(self, tensors):
        """Process 0's values of `tensors` on every process."""
        for t in tensors:
            if self.world > 1:
                dist.broadcast(t, 0)

    def average_(self, tensors):
        for t in tensors:
            if self.world > 1 and t.is_floating_point():
                dist.all_reduce(t)
                t /= self.world

    def gather_objects(self, obj):
        """[obj of every process], in rank order."""
        if self.world == 1:
            return [obj]
        gathered = [None] * self.world
        dist.all_gather_object(gathered, obj)
        return gathered

    def barrier(self):
        if self.world > 1:
            dist.barrier()

    def close(self):
        if self.world > 1:
            dist.destroy_process_group()
