"""torchrun support: one process per device, gloo on CPU and nccl on CUDA; DDP or FSDP2.

Checkpoints hold *full* states whatever the parallelism (weights by name, optimizer state keyed by parameter
name, one RNG state per rank), so a checkpoint written by FSDP loads in one process and the other way round.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def is_main() -> bool:
    """True in the process that writes files and prints: rank 0 under torchrun, or a lone process.

    Usable before the process group exists (torchrun sets RANK in the environment of every worker).
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def setup(device: torch.device) -> Dist:
    """Join the process group that torchrun describes in the environment; a no-op for one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(local)
    return Dist(rank, world, local)


def device_for(device: torch.device, d: Dist) -> torch.device:
    return torch.device("cuda", d.local_rank) if device.type == "cuda" else device


def mean_across(value: float, d: Dist, device) -> float:
    if d.world <= 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item() / d.world


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: nn.Module, d: Dist, parallel: str, device: torch.device) -> nn.Module:
    """The module the loop calls: the model itself (one process), a DDP wrapper, or the model sharded in place.

    FSDP shards each entry of every ModuleList (the layers) and then the root, so a layer's weights are
    gathered only while it runs; weights shared across layers (tied embeddings) belong to the root.
    """
    if d.world <= 1:
        return model
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    # DDP copies rank 0's weights to every rank; FSDP keeps whatever each rank holds, so do the same here.
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            dist.broadcast(t.data, 0)
    mesh = init_device_mesh(device.type, (d.world,))
    for m in model.modules():
        if isinstance(m, nn.ModuleList):
            for layer in m:
                fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def sync_grads(wrapped: nn.Module, sync: bool):
    """Context for one micro-batch's backward: skip the gradient reduction unless `sync` (accumulation)."""
    import contextlib

    if sharded(wrapped):
        wrapped.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()
    if sync or not hasattr(wrapped, "no_sync"):
        return contextlib.nullcontext()
    return wrapped.no_sync()


def to_float(t) -> float:
    """A norm from clip_grad_norm_ (a DTensor under FSDP) as a Python float."""
    return float(t.full_tensor() if hasattr(t, "full_tensor") else t)


def _param_names(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_parameters()]


def _full_options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def full_model_state(model: nn.Module, d: Dist) -> dict[str, torch.Tensor]:
    """Every weight by name, on CPU, in the main process ({} elsewhere); tied aliases appear once.

    Under FSDP every rank must call this (it gathers shards); otherwise only the main process needs to.
    """
    if sharded(model):
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        state = get_model_state_dict(model, options=_full_options(cpu_offload=True))
    elif d.main:
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    else:
        return {}
    own = set(_param_names(model))  # the first name of each parameter: tied aliases are left out
    aliases = {n for n, _ in model.named_parameters(remove_duplicate=False)} - own
    return {k: v.contiguous() for k, v in state.items() if k not in aliases} if d.main else {}


def full_optim_state(model: nn.Module, opt: torch.optim.Optimizer, d: Dist) -> dict | None:
    """The optimizer state keyed by parameter name (torch.distributed.checkpoint's "full" layout)."""
    if sharded(model):
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        state = get_optimizer_state_dict(model, opt, options=_full_options(cpu_offload=True))
        return state if d.main else None
    if not d.main:
        return None
    sd = opt.state_dict()
    name = dict(enumerate(_ordered_names(model, opt)))
    return {"state": {name[i]: s for i, s in sd["state"].items()},
            "param_groups": [{**g, "params": [name[i] for i in g["params"]]} for g in sd["param_groups"]]}


def load_optim_state(model: nn.Module, opt: torch.optim.Optimizer, state: dict) -> None:
    """Load a state from `full_optim_state` (or an older one keyed by index) into `opt`."""
    names = _ordered_names(model, opt)
    keys = list(state.get("state", {}))
    if keys and not isinstance(keys[0], str):  # keyed by index, as opt.state_dict() writes it
        state = {"state": {names[i]: s for i, s in state["state"].items()},
                 "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]}
    if sharded(model):
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        set_optimizer_state_dict(model, opt, state, options=_full_options())
        return
    index = {n: i for i, n in enumerate(names)}
    unknown = sorted(set(state["state"]) - set(index))
    if unknown:
        raise ValueError(f"parameters {unknown[:3]} are not in the model")
    opt.load_state_dict({
        "state": {index[n]: s for n, s in state["state"].items()},
        "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in state["param_groups"]]})


def _ordered_names(model: nn.Module, opt: torch.optim.Optimizer) -> list[str]:
    """Names of the optimizer's parameters in the order opt.state_dict() numbers them."""
    by_id = {id(p): n for n, p in model.named_parameters()}
    return [by_id[id(p)] for g in opt.param_groups for p in g["params"]]


def rng_states(device: torch.device, d: Dist) -> list[dict]:
    """Every rank's generator states (rank order), so that each rank resumes its own dropout stream."""
    own = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        own["cuda"] = torch.cuda.get_rng_state(device)
    if d.world <= 1:
        return [own]
    out: list = [None] * d.world
    dist.all_gather_object(out, own)
    return out


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
