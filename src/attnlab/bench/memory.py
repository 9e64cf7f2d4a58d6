"""Peak memory of a piece of work, on CUDA and on CPU.

CUDA: the caching allocator's own peak counter. CPU has no such counter, so a dispatch mode watches every
tensor that ops create inside the measured call and keeps a live-bytes tally per storage (views and in-place
results share their base's storage and are not counted twice). It measures tensor memory that the work
allocates (activations, saved tensors, gradients), not allocator overhead or tensors that existed before.
"""

from __future__ import annotations

import weakref
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class _LiveBytes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._refs: dict[int, list[int]] = {}  # storage ptr -> [tensor refcount, bytes]

    def _release(self, ptr):
        entry = self._refs.get(ptr)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            self.live -= entry[1]
            del self._refs[ptr]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
                continue
            st = t.untyped_storage()
            ptr, nbytes = st.data_ptr(), st.nbytes()
            if nbytes == 0:
                continue
            if ptr in self._refs:
                self._refs[ptr][0] += 1
            elif ptr in inputs:
                continue  # a view or in-place result of a tensor that predates the measurement
            else:
                self._refs[ptr] = [1, nbytes]
                self.live += nbytes
                self.peak = max(self.peak, self.live)
            weakref.finalize(t, self._release, ptr)
        return out


def peak_memory(fn: Callable[[], object], device: torch.device | str = "cpu") -> tuple[object, int]:
    """Run fn() and return (its result, peak bytes of tensor memory it allocated beyond what existed before)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = fn()
        torch.cuda.synchronize(device)
        return result, torch.cuda.max_memory_allocated(device) - base
    tracker = _LiveBytes()
    with tracker:
        result = fn()
    return result, tracker.peak


def training_step_peak(model: torch.nn.Module, task, device) -> float:
    """Peak tensor memory (MB) of one training forward + backward on the task's first batch, the weights
    excluded."""
    batch = task.batch(0, 0, 0, device)

    def step():
        model.train()
        task.loss(model, batch)[0].backward()
        model.zero_grad(set_to_none=True)

    return peak_memory(step, device)[1] / 2**20
