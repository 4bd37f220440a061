"""
Decisions that every process takes alike from facts the host holds (a batch ran out, images were skipped, a stop
signal came): summed over the processes on the CPU, so that the host never waits for the work queued on an
accelerator to read one back.
"""

import torch
import torch.distributed as dist
from accelerate import Accelerator

# The gloo group of each default process group whose backend cannot reduce CPU tensors (NCCL), made once.
_CPU_GROUPS: dict = {}


def _cpu_group() -> "dist.ProcessGroup | None":
    """
    The process group that reduces CPU tensors: the default one when its backend can (gloo, mpi), else a gloo group
    over the same processes, made once (every process makes it at its first call, as `new_group` needs).
    """
    backend = dist.get_backend()
    if "gloo" in backend or backend == "mpi":
        return None
    default = dist.group.WORLD
    if default not in _CPU_GROUPS:
        _CPU_GROUPS[default] = dist.new_group(backend="gloo")
    return _CPU_GROUPS[default]


def host_sum(accelerator: Accelerator, values: list[float]) -> list[float]:
    """
    `values` summed over every process (the same list on each), reduced on the CPU: over the default group, or a
    gloo group beside NCCL. Processes joined by their accelerators' own runtime (TPU) reduce through the device.
    One process: `values` as they are.
    """
    if accelerator.num_processes == 1:
        return [float(value) for value in values]
    flags = torch.tensor(values, dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(flags, group=_cpu_group())
    else:
        flags = accelerator.reduce(flags.to(accelerator.device), "sum").cpu()
    return flags.tolist()
