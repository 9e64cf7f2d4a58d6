"""int8 for CPU inference: every Linear layer (and the embedding) as int8 weights with one fp32 scale per output
row, saved as plain tensors in safetensors so that loading unpickles nothing.

Schemes:
  dynamic      activations are quantised at run time too (int8 × int8 matmuls; the fast one on CPU).
  weight-only  int8 weights, dequantised per call; the matmul stays in the activations' dtype.

Routes of the dynamic scheme, chosen at run time (`route="auto"`):
  fbgemm   torch.ops.quantized.linear_dynamic on weights prepacked from our int8 tensors; the fastest measured
           here on one CPU thread. Only the prepack needs a qint8 tensor, built at load from the plain ones.
  int_mm   per-row activation quantisation in plain torch and torch._int_mm: needs no quantized op, so it
           survives the removal of torch.ao / torch.ops.quantized that PyTorch has announced.
  dequant  what is left everywhere else (CUDA, or no int8 matmul): weight-only arithmetic.
The saved format does not depend on the route: a checkpoint loads on any of them.

The model can be any torch module: an attnlab LM or a transformers causal LM alike. Which modules are swapped
is decided by their type, never by their names: every nn.Linear and nn.Embedding except those `kept_reason`
names (a subclass with its own forward, which the swap would lose; nn.MultiheadAttention's out_proj, whose
weight its owner reads directly; an embedding with max_norm, whose lookups renormalise rows in place). A Linear
that shares its weight with a swapped embedding (tied input and output embeddings) becomes a head reading the
embedding's int8 table, so the table is stored once.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError

SCHEMES = ("dynamic", "weight-only")
ROUTES = ("auto", "fbgemm", "int_mm", "dequant")


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: w ≈ q · scale[:, None], q in [-127, 127]."""
    w = w.detach().float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp_min(1e-12)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def _fbgemm_available() -> bool:
    try:
        return "fbgemm" in torch.backends.quantized.supported_engines and hasattr(torch.ops.quantized, "linear_dynamic")
    except (AttributeError, RuntimeError):
        return False


def _int_mm_available() -> bool:
    try:
        torch._int_mm(torch.zeros(32, 8, dtype=torch.int8), torch.zeros(8, 8, dtype=torch.int8))
        return True
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


def resolve_route(route: str, device: torch.device) -> str:
    if route not in ROUTES:
        raise UserError(f"unknown int8 route {route!r}; choose one of: {', '.join(ROUTES)}")
    if device.type != "cpu":
        return "dequant"
    if route == "auto":
        return "fbgemm" if _fbgemm_available() else ("int_mm" if _int_mm_available() else "dequant")
    return route


class Int8Linear(nn.Module):
    """y = x Wᵀ + b with W stored as int8 rows and fp32 scales (buffers: they follow .to(device))."""

    def __init__(self, in_features: int, out_features: int, bias: bool, *, scheme: str = "dynamic",
                 route: str = "auto"):
        super().__init__()
        self.in_features, self.out_features, self.scheme, self.route = in_features, out_features, scheme, route
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(out_features))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self._packed, self._packed_key = None, None

    @classmethod
    def from_linear(cls, lin: nn.Linear, scheme: str, route: str = "auto") -> "Int8Linear":
        m = cls(lin.in_features, lin.out_features, lin.bias is not None, scheme=scheme, route=route)
        q, s = quantize_rows(lin.weight)
        m.qweight.copy_(q)
        m.scale.copy_(s)
        if lin.bias is not None:
            m.bias.copy_(lin.bias.detach().float())
        return m.to(lin.weight.device)

    def dequantized(self, dtype=torch.float32) -> torch.Tensor:
        return self.qweight.to(dtype) * self.scale.to(dtype)[:, None]

    def forward(self, x):
        route = "dequant" if self.scheme == "weight-only" else resolve_route(self.route, x.device)
        if route == "fbgemm" and x.dtype == torch.float32:
            shape = x.shape
            y = torch.ops.quantized.linear_dynamic(x.reshape(-1, shape[-1]), self._prepacked(), True)
            return y.reshape(*shape[:-1], self.out_features)
        if route == "int_mm" and x.dtype == torch.float32:
            return self._int_mm(x)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized(x.dtype), bias)

    def _prepacked(self):
        # Rebuilt when the weights change in place (load_state_dict copies into the same buffer) or move.
        key = (self.qweight.data_ptr(), self.qweight._version, self.scale._version)
        if self._packed_key != key:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # qint8 tensors are deprecated; this one lives only in the pack
                wq = torch._make_per_channel_quantized_tensor(
                    self.qweight.cpu(), self.scale.double().cpu(), torch.zeros(self.out_features, dtype=torch.long), 0)
                self._packed = torch.ops.quantized.linear_prepack(wq, self.bias)
            self._packed_key = key
        return self._packed

    def _int_mm(self, x):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        sx = (x2.abs().amax(dim=1, keepdim=True) / 127.0).clamp_min(1e-12)
        xq = torch.round(x2 / sx).clamp(-127, 127).to(torch.int8)
        m = xq.shape[0]
        if m <= 16:  # _int_mm wants more than 16 rows
            xq = F.pad(xq, (0, 0, 0, 17 - m))
        y = torch._int_mm(xq, self.qweight.t())[:m].float() * sx * self.scale
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self):
        return f"{self.in_features}, {self.out_features}, scheme={self.scheme}, bias={self.bias is not None}"


class Int8Embedding(nn.Module):
    """An embedding table as int8 rows with fp32 scales; a lookup dequantises the rows it reads into the dtype
    of the table it replaces (a bfloat16 model keeps bfloat16 hidden states)."""

    def __init__(self, num: int, dim: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.out_dtype = num, dim, dtype
        self.register_buffer("qweight", torch.zeros(num, dim, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(num))

    @classmethod
    def from_embedding(cls, emb: nn.Embedding) -> "Int8Embedding":
        m = cls(emb.num_embeddings, emb.embedding_dim, emb.weight.dtype)
        q, s = quantize_rows(emb.weight)
        m.qweight.copy_(q)
        m.scale.copy_(s)
        return m.to(emb.weight.device)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantised table (for code that reads .weight, e.g. parameter counts)."""
        return self.qweight.float() * self.scale[:, None]

    def forward(self, idx):
        return (F.embedding(idx, self.qweight).float() * self.scale[idx, None]).to(self.out_dtype)


class TiedInt8Head(nn.Module):
    """The output head of a model with tied embeddings: it reads the embedding's int8 table, which is saved once."""

    def __init__(self, embed: Int8Embedding, scheme: str, route: str = "auto"):
        super().__init__()
        self.in_features, self.out_features = embed.embedding_dim, embed.num_embeddings
        # Lists keep both out of this module's state_dict and .to(): the embedding owns the table.
        self._embed = [embed]
        self._lin = [Int8Linear(embed.embedding_dim, embed.num_embeddings, False, scheme=scheme, route=route)]

    @property
    def weight(self) -> torch.Tensor:
        """The dequantised table (for code that reads the output embedding's .weight)."""
        return self._embed[0].weight

    def forward(self, x):
        e, lin = self._embed[0], self._lin[0]
        lin.qweight, lin.scale = e.qweight, e.scale  # the same tensors, wherever .to() moved them
        return lin(x)


def kept_reason(module: nn.Module) -> str | None:
    """Why this Linear or Embedding must stay in float (None: it is quantised). Decided by type, so that any
    model (attnlab's or transformers') is treated alike."""
    base = nn.Linear if isinstance(module, nn.Linear) else nn.Embedding
    if type(module).forward is not base.forward:
        return f"{type(module).__name__} has its own forward, which an int8 module would not run"
    if isinstance(module, _OWNER_READS_WEIGHT):
        return "nn.MultiheadAttention reads this projection's weight directly instead of calling it"
    if base is nn.Embedding and module.max_norm is not None:
        return "an embedding with max_norm renormalises the rows it looks up, in place"
    return None


# torch's own dynamic quantisation skips this class for the same reason (its owner reads .weight).
_OWNER_READS_WEIGHT = tuple(c for c in (getattr(nn.modules.linear, "NonDynamicallyQuantizableLinear", None),) if c)


def quantize_model(model: nn.Module, scheme: str = "dynamic", route: str = "auto") -> dict:
    """Swap, in place, every nn.Linear for an Int8Linear and every nn.Embedding for an Int8Embedding, except
    the modules `kept_reason` keeps in float; a Linear tied to a swapped embedding reads its int8 table.
    Returns the manifest that `load_quantized` rebuilds the model from (it lists the kept modules and why)."""
    if scheme not in SCHEMES:
        raise UserError(f"unknown quantisation scheme {scheme!r}; choose one of: {', '.join(SCHEMES)}")
    kept, embeddings, linears = {}, {}, {}
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            why = kept_reason(m)
            if why:
                kept[name] = why
            else:
                (linears if isinstance(m, nn.Linear) else embeddings)[name] = m
    by_weight = {id(e.weight): name for name, e in embeddings.items()}
    # A head with a bias of its own is quantised on its own: the tied head has no place for the bias.
    tied = {name: by_weight[id(m.weight)] for name, m in linears.items()
            if id(m.weight) in by_weight and m.bias is None}
    plain = [name for name in linears if name not in tied]
    _swap(model, list(embeddings), plain, tied, scheme, route, convert=True)
    return {"scheme": scheme, "linears": plain, "embeddings": list(embeddings), "tied": tied, "kept": kept}


def _swap(model, embeddings, linears, tied: dict[str, str], scheme, route, *, convert: bool) -> None:
    for name in embeddings:
        old = model.get_submodule(name)
        if convert:
            new = Int8Embedding.from_embedding(old)
        else:
            new = Int8Embedding(old.num_embeddings, old.embedding_dim, old.weight.dtype).to(old.weight.device)
        model.set_submodule(name, new)
    for name in linears:
        old = model.get_submodule(name)
        if convert:
            new = Int8Linear.from_linear(old, scheme, route)
        else:
            new = Int8Linear(old.in_features, old.out_features, old.bias is not None, scheme=scheme,
                             route=route).to(old.weight.device)
        model.set_submodule(name, new)
    for head, embed in tied.items():
        model.set_submodule(head, TiedInt8Head(model.get_submodule(embed), scheme, route))


def _ties(manifest: dict) -> dict[str, str]:
    if "tied" in manifest:
        return dict(manifest["tied"])
    # manifests written before ties were found by weight sharing: an attnlab LM's head tied to its embed
    return {"head": "embed"} if manifest.get("tied_head") else {}


def is_quantized(record: dict) -> bool:
    return bool(record.get("quantized"))


def load_quantized(model: nn.Module, tensors: dict[str, torch.Tensor], manifest: dict, route: str = "auto") -> nn.Module:
    """Turn a freshly built fp32 model into the int8 one described by `manifest` and fill it from plain tensors."""
    scheme = manifest.get("scheme")
    if scheme not in SCHEMES:
        raise UserError(f"checkpoint's quantisation scheme {scheme!r} is unknown; known: {', '.join(SCHEMES)}")
    try:
        _swap(model, manifest.get("embeddings", []), manifest.get("linears", []), _ties(manifest),
              scheme, route, convert=False)
    except (AttributeError, TypeError) as e:
        raise UserError(f"quantised checkpoint does not match its model config: {e}") from None
    want = model.state_dict()
    missing, extra = sorted(set(want) - set(tensors)), sorted(set(tensors) - set(want))
    if missing or extra:
        what = f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}"
        raise UserError(f"quantised checkpoint does not match its model: {what} tensors")
    for name, t in tensors.items():
        if want[name].shape != t.shape or want[name].dtype != t.dtype:
            raise UserError(f"quantised checkpoint does not match its model: {name} is {tuple(t.shape)} {t.dtype}, "
                            f"expected {tuple(want[name].shape)} {want[name].dtype}")
    model.load_state_dict(tensors, strict=True)
    return model


def quantized_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}


def load_quantized_checkpoint(model: nn.Module, ckpt, manifest: dict) -> nn.Module:
    """Fill a freshly built fp32 model from a quantised checkpoint folder (safetensors only: nothing unpickled)."""
    from pathlib import Path

    from ..training.checkpoint import read_safetensors

    tensors, _ = read_safetensors(Path(ckpt) / "model.safetensors")
    return load_quantized(model, tensors, manifest)
