"""A Vision Transformer (Dosovitskiy et al., arXiv 2010.11929) whose attention comes from the registry.
Read it top to bottom.

images [B, C, H, W] -> P×P patches, each projected to d_model (a strided convolution, which is a linear map of
the flattened patch; with patch_kernel > P, of a larger window centred on it, so neighbouring tokens overlap)
-> row-major token sequence, optionally led by a class token -> plus 2-D positions (learned, or fixed sin-cos
as in MAE) -> pre-norm blocks with non-causal attention -> final norm -> the class token's state or the mean
over patch tokens -> linear classification head.

Attention is built by the same `build_attention_layers` as the language model, so any registered mechanism
and key/value transform can run in chosen layers. KV shifting mixes each key with its predecessor in sequence
order, which in a ViT is the patch to its left (or the previous row's last patch); the first patch gets a
reset so that it never mixes with the class token, which is a summary slot rather than a neighbouring patch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..attention import AttentionSpec
from ..errors import UserError
from .blocks import Block, make_norm
from .lm import build_attention_layers


@dataclass
class ViTConfig:
    image_size: int = 28
    """image height (and width, unless image_width is set); `--task image` takes it from the data"""
    image_width: int = 0
    """image width; 0: square images"""
    patch_size: int = 4
    """side of the square patches (tokens per image: (H/P)·(W/P), plus the class token)"""
    patch_kernel: int = 0
    """side of the patch-embedding window; 0: patch_size (non-overlapping patches). Larger: overlapping
    patches, each token embedding a window around its patch (zero-padded at the border), same token count"""
    channels: int = 1
    """image channels (taken from the data by `--task image`)"""
    num_classes: int = 10
    """classes (taken from the data by `--task image`)"""
    n_layer: int = 6
    """Transformer blocks"""
    n_head: int = 4
    """attention heads"""
    n_kv_head: int | None = None
    """key/value heads: fewer than n_head for grouped-query attention; null: n_head"""
    d_model: int = 128
    """width of the token states"""
    d_ff: int | None = None
    """hidden width of the MLP; null: 4·d (gelu) or ≈8/3·d (swiglu)"""
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    """normalisation layers"""
    mlp: Literal["gelu", "swiglu"] = "gelu"
    """MLP kind"""
    pool: Literal["cls", "mean"] = "cls"
    """read the class from a class token (cls) or the mean of the patch tokens (mean)"""
    pos: Literal["learned", "sincos", "none"] = "learned"
    """patch positions: learned, fixed 2-D sin-cos, or none"""
    dropout: float = 0.0
    """dropout on the embeddings, residual branches and MLP"""
    bias: bool = True
    """biases in the linear layers and norms"""
    attention: AttentionSpec = field(default_factory=AttentionSpec)
    """the attention mechanism (name, options, layers) and key/value transform"""

    def __post_init__(self):
        named = dict(image_size=self.image_size, patch_size=self.patch_size, channels=self.channels,
                     n_layer=self.n_layer, n_head=self.n_head, d_model=self.d_model)
        for name, value in named.items():
            if not isinstance(value, int) or value < 1:
                raise UserError(f"ViT {name} must be a positive integer, got {value!r}")
        if self.image_width < 0:
            raise UserError(f"ViT image_width must be positive (or 0 for square images), got {self.image_width}")
        if self.num_classes < 2:
            raise UserError(f"ViT num_classes must be at least 2, got {self.num_classes}")
        if self.d_ff is not None and self.d_ff < 1:
            raise UserError(f"ViT d_ff must be positive, got {self.d_ff}")
        if self.patch_kernel and not self.patch_size <= self.patch_kernel <= min(self.image_size, self.width):
            raise UserError(f"ViT patch_kernel must be 0 or between patch_size={self.patch_size} and the image side, "
                            f"got {self.patch_kernel}")
        if self.patch_kernel and self.patch_size == 1 and self.patch_kernel % 2 == 0:
            raise UserError(f"with patch_size=1 the patch_kernel must be odd to keep one token per pixel, "
                            f"got {self.patch_kernel}")
        if self.image_size % self.patch_size or self.width % self.patch_size:
            raise UserError(f"image size {self.image_size}x{self.width} is not divisible by patch_size={self.patch_size}")
        if self.d_model % self.n_head:
            raise UserError(f"d_model={self.d_model} is not divisible by n_head={self.n_head}")
        if self.n_kv_head is not None and (self.n_kv_head < 1 or self.n_head % self.n_kv_head):
            raise UserError(f"n_head={self.n_head} is not a multiple of n_kv_head={self.n_kv_head}")
        if self.pos == "sincos" and self.d_model % 4:
            raise UserError(f"pos=sincos splits d_model in four (sin/cos of rows and columns); d_model={self.d_model} is not a multiple of 4")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.pool not in ("cls", "mean"):
            raise UserError(f"pool must be cls or mean, got {self.pool!r}")
        if self.pos not in ("learned", "sincos", "none"):
            raise UserError(f"pos must be learned, sincos or none, got {self.pos!r}")

    @property
    def width(self) -> int:
        return self.image_width or self.image_size

    @property
    def kernel(self) -> int:
        return self.patch_kernel or self.patch_size

    @property
    def grid_shape(self) -> tuple[int, int]:
        """Patches per column and per row."""
        return self.image_size // self.patch_size, self.width // self.patch_size

    @property
    def num_patches(self) -> int:
        h, w = self.grid_shape
        return h * w

    @property
    def seq_len(self) -> int:
        return self.num_patches + (self.pool == "cls")


def sincos_2d(grid_h: int, grid_w: int, d: int) -> torch.Tensor:
    """Fixed 2-D sin-cos positions [grid_h·grid_w, d] in row-major order (as in MAE): the first half of the
    channels encodes the row, the second half the column, each with the 1-D sinusoids of "Attention Is All
    You Need" at frequencies 1/10000^(i/(d/4))."""
    quarter = d // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(torch.arange(grid_h, dtype=torch.float64), torch.arange(grid_w, dtype=torch.float64),
                                indexing="ij")

    def one(coord):
        ang = coord.reshape(-1, 1) * omega
        return torch.cat([ang.sin(), ang.cos()], dim=1)

    return torch.cat([one(rows), one(cols)], dim=1).float()


class ViT(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        # A window of side k ≥ P moved by P with ceil((k − P)/2) zeros each side gives exactly (H/P)·(W/P) tokens.
        p, k = cfg.patch_size, cfg.kernel
        self.patch_embed = nn.Conv2d(cfg.channels, cfg.d_model, kernel_size=k, stride=p, padding=(k - p + 1) // 2,
                                     bias=cfg.bias)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.d_model)) if cfg.pool == "cls" else None
        if cfg.pos == "learned":
            self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches, cfg.d_model))
        elif cfg.pos == "sincos":
            self.register_buffer("pos_embed", sincos_2d(*cfg.grid_shape, cfg.d_model)[None], persistent=False)
        else:
            self.pos_embed = None
        self.drop = nn.Dropout(cfg.dropout)
        attns = build_attention_layers(cfg, causal=False, rotary=False)
        self.blocks = nn.ModuleList(Block(cfg, a, causal=False) for a in attns)
        self.ln_f = make_norm(cfg.norm, cfg.d_model, cfg.bias)
        self.head = nn.Linear(cfg.d_model, cfg.num_classes, bias=True)
        self._init_weights()

    def _init_weights(self):
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, 0.0, 0.02)
        if isinstance(self.pos_embed, nn.Parameter):
            nn.init.normal_(self.pos_embed, 0.0, 0.02)
        # GPT-2's scaled init of residual projections, as in the LM: the residual stream's variance stays flat.
        for name, prm in self.named_parameters():
            if name.endswith(("o_proj.weight", "down.weight")):
                nn.init.normal_(prm, 0.0, 0.02 / math.sqrt(2 * self.cfg.n_layer))

    def _reset(self, b: int, n: int, device) -> torch.Tensor:
        # A transform must not reach from the first patch back into the class token (see module docstring).
        reset = torch.zeros(b, n, dtype=torch.bool, device=device)
        reset[:, n - self.cfg.num_patches] = True
        return reset

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, C, H, W] -> final-normed token states [B, seq_len, d] (class token first, if any)."""
        cfg = self.cfg
        want = (cfg.channels, cfg.image_size, cfg.width)
        if images.dim() != 4 or tuple(images.shape[1:]) != want:
            raise UserError(f"the ViT takes images of shape [B, {want[0]}, {want[1]}, {want[2]}], got {list(images.shape)}")
        if not images.is_floating_point():
            raise UserError(f"the ViT takes float images (normalised), got {images.dtype}")
        x = self.patch_embed(images).flatten(2).transpose(1, 2)  # [B, num_patches, d], row-major
        if self.pos_embed is not None:
            x = x + self.pos_embed.to(x.dtype)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        x = self.drop(x)
        reset = self._reset(x.shape[0], x.shape[1], x.device)
        for block in self.blocks:
            x = block(x, reset=reset)
        return self.ln_f(x)

    def forward(self, images: torch.Tensor, targets: torch.Tensor | None = None):
        """images: [B, C, H, W] float. Returns logits [B, num_classes], or (logits, mean cross-entropy) when
        targets [B] (class indices) are given."""
        x = self.tokens(images)
        pooled = x[:, 0] if self.cfg.pool == "cls" else x.mean(dim=1)
        logits = self.head(pooled)
        if targets is None:
            return logits
        return logits, F.cross_entropy(logits.float(), targets)

    def num_params(self) -> int:
        """All trainable parameters (patch projection, class token, learned positions and head included)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)
