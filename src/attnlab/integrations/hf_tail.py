"""Score many "last n layers patched" variants of one model on one window without recomputing the shared prefix.

Patching the last n layers leaves the first N − n layers' output untouched, so the unpatched pass can hand its
hidden states at each boundary to every variant, which then runs only its last n layers (plus the final norm
and head). On a CPU at 8192 tokens that turns a sweep of 15 variants from 16 full forward passes into about
six. Times are taken side by side on the same tails: the patched tail against the unpatched tail.

The tail runs through the model's own forward with `inputs_embeds` = the boundary states and its layer list
cut to the tail, which is exact for decoders whose forward adds nothing to the embeddings before the first
layer (Llama, Mistral, Qwen2, SmolLM; not Gemma, which scales them). `check_tail` verifies that on a short
prefix before any number is produced and refuses an architecture where it does not hold.
"""

from __future__ import annotations

import contextlib
import time

import torch
from torch import nn

from ..bench.measure import sync
from ..errors import UserError


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    inner = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise UserError(f"{type(model).__name__} keeps no `layers` list in its decoder; cannot run layer tails")
    return layers


@contextlib.contextmanager
def only_layers(model: nn.Module, first: int):
    """The model's decoder runs only its layers from `first` on, inside the block."""
    inner = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    full = inner.layers
    inner.layers = nn.ModuleList(list(full)[first:])
    try:
        yield
    finally:
        inner.layers = full


def boundary_states(model: nn.Module, ids: torch.Tensor, firsts: list[int]):
    """One unpatched-or-not full forward: (logits, {first: hidden states entering layer `first`}, seconds)."""
    layers = decoder_layers(model)
    seen, hooks = {}, []
    for f in set(firsts):
        def grab(mod, args, kwargs, f=f):
            seen[f] = (args[0] if args else kwargs["hidden_states"]).detach()
        hooks.append(layers[f].register_forward_pre_hook(grab, with_kwargs=True))
    try:
        logits, seconds = timed_logits(model, ids)
    finally:
        for h in hooks:
            h.remove()
    return logits, seen, seconds


def tail_logits(model: nn.Module, states: torch.Tensor, first: int):
    """(logits, seconds) of layers first.. + head on the boundary `states`."""
    with only_layers(model, first):
        return timed_logits(model, None, inputs_embeds=states)


def timed_logits(model, ids, **kw):
    device = next(model.parameters()).device
    with torch.no_grad():
        sync(device)
        t0 = time.perf_counter()
        logits = model(input_ids=ids, use_cache=False, **kw).logits
        sync(device)
    return logits, time.perf_counter() - t0


def check_tail(model: nn.Module, ids: torch.Tensor, first: int, n: int = 64) -> None:
    """Refuse unless the tail from `first` reproduces the full forward on the first `n` tokens."""
    x = ids[:, :n]
    full, seen, _ = boundary_states(model, x, [first])
    tail, _ = tail_logits(model, seen[first], first)
    if not torch.allclose(full, tail, rtol=1e-4, atol=1e-4):
        raise UserError(f"{type(model).__name__}: running layers {first}.. on the earlier layers' states does not "
                        "reproduce its forward (its forward transforms the embeddings); score full passes instead")


def nll(logits: torch.Tensor, ids: torch.Tensor) -> float:
    """Mean next-token negative log-likelihood in nats, in float32."""
    lp = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return -float(lp.double().mean())
