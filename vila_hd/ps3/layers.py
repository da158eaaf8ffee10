"""Building blocks of the PS3 vision tower in plain PyTorch, with timm's parameter names.

Attention takes an optional key/value *prefix*: the high-res tokens of a look-close step attend to
the low-res tokens' keys and values of the same layer followed by their own.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

_ACTIVATIONS = {
    "gelu": lambda: nn.GELU(),
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "gelu_pytorch_tanh": lambda: nn.GELU(approximate="tanh"),
    "quick_gelu": lambda: _QuickGELU(),
}


class _QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def activation(name: str) -> nn.Module:
    if name not in _ACTIVATIONS:
        raise ValueError(f"unknown hidden_act {name!r}; known: {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]()


class Mlp(nn.Module):
    """fc1 -> act -> [norm] -> fc2 (timm's Mlp; ``norm`` only where the reference has one)."""

    def __init__(self, dim: int, hidden: int, out: int | None = None, act: str = "gelu", norm_eps: float | None = None):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = activation(act)
        self.norm = nn.LayerNorm(hidden, eps=norm_eps) if norm_eps is not None else nn.Identity()
        self.fc2 = nn.Linear(hidden, out or dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.norm(self.act(self.fc1(x))))


class Attention(nn.Module):
    """Multi-head self-attention with fused qkv and an optional low-res key/value prefix.

    Keys and values stay token-major (B, N, C), and SDPA reads q/k/v as strided head views (no
    transposed copies). With a prefix, ``prefix_mode`` picks how the two key sets are combined:
    ``"concat"`` joins them with one copy per layer (always used when gradients are needed);
    ``"merge"`` attends to the prefix and to the own keys separately and merges the two results by
    their log-sum-exp, so the shared prefix is never copied per sequence; ``"auto"`` merges on CUDA in
    half precision when at least ``MERGE_MIN_SEQUENCES`` sequences share one prefix (measured on an H100
    at SO400M sizes, per layer: 6 x 2560 tokens 0.79 ms merged vs 0.87 ms joined, 12 x 2560 1.50 vs 1.72;
    at 1-2 sequences the merge gains nothing, and for short ones its two extra kernels cost more).
    """

    def __init__(self, dim: int, num_heads: int, prefix_mode: str = "auto"):
        super().__init__()
        if prefix_mode not in PREFIX_MODES:
            raise ValueError(f"prefix_mode must be one of {PREFIX_MODES}, got {prefix_mode!r}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.prefix_mode = prefix_mode
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(
        self,
        x: torch.Tensor,
        kv_prefix: tuple[torch.Tensor, torch.Tensor] | None = None,
        return_kv: bool = False,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """``kv_prefix``: (B or 1, M, C) keys and values prepended to this sequence's own."""
        b, n, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=-1)
        own_kv = (k, v) if return_kv else None
        if kv_prefix is not None and self._merges(x, kv_prefix[0].shape[0]):
            out = merged_prefix_attention(q, k, v, kv_prefix, self.num_heads)
        else:
            if kv_prefix is not None:
                k = torch.cat([kv_prefix[0].expand(b, -1, -1), k], dim=1)
                v = torch.cat([kv_prefix[1].expand(b, -1, -1), v], dim=1)
            out = F.scaled_dot_product_attention(*(split_heads(t, self.num_heads) for t in (q, k, v)))
        return self.proj(out.transpose(1, 2).reshape(b, n, c)), own_kv

    def _merges(self, x: torch.Tensor, prefix_batch: int) -> bool:
        if self.prefix_mode == "concat" or torch.is_grad_enabled():  # the merge has no backward
            return False
        if self.prefix_mode == "merge":
            return True
        shared = prefix_batch == 1 and x.shape[0] >= MERGE_MIN_SEQUENCES
        return shared and x.is_cuda and x.dtype in (torch.float16, torch.bfloat16)


PREFIX_MODES = ("auto", "concat", "merge")
MERGE_MIN_SEQUENCES = 4


def split_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, C) -> (B, heads, N, C // heads) as a view."""
    return t.unflatten(-1, (heads, t.shape[-1] // heads)).transpose(1, 2)


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention (B, H, N, D) and the log-sum-exp of its scaled scores (B, H, N), in fp32."""
    aten = torch.ops.aten
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        try:
            out, lse = aten._scaled_dot_product_cudnn_attention(q, k, v, None, True)[:2]
        except RuntimeError:  # no cuDNN attention for this device/shape: the flash kernel
            out, lse = aten._scaled_dot_product_flash_attention(q, k, v)[:2]
    elif q.is_cuda:
        out, lse = aten._scaled_dot_product_efficient_attention(q, k, v, None, True)[:2]
    elif q.device.type == "cpu":
        out, lse = aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)
    else:
        scores = (q.float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
        lse = scores.logsumexp(-1)
        out = (torch.softmax(scores, -1) @ v.float()).to(q.dtype)
    # Kernels differ in how they shape the statistics: (B, H, N), (B, H, N, 1) or padded (B, H, N').
    return out, lse.reshape(*q.shape[:2], -1)[..., : q.shape[2]].float()


def merged_prefix_attention(q, k, v, kv_prefix, heads: int) -> torch.Tensor:
    """Attention of (B, N, C) queries over [prefix; own] keys without joining them: one pass over the
    prefix (every sequence's queries at once when the prefix is shared), one over the own keys, and
    the two normalised results mixed by ``sigmoid(lse_prefix - lse_own)``. Returns (B, H, N, D)."""
    b, n, c = q.shape
    k_pre, v_pre = kv_prefix
    own, lse_own = attention_with_lse(*(split_heads(t, heads) for t in (q, k, v)))
    if k_pre.shape[0] == 1 and b > 1:  # a shared prefix: all sequences' queries as one long sequence
        pre, lse_pre = attention_with_lse(*(split_heads(t, heads) for t in (q.reshape(1, b * n, c), k_pre, v_pre)))
        pre = pre.transpose(1, 2).reshape(b, n, heads, c // heads).transpose(1, 2)
        lse_pre = lse_pre.view(heads, b, n).transpose(0, 1)
    else:
        pre, lse_pre = attention_with_lse(*(split_heads(t.expand(b, -1, -1), heads) for t in (q, k_pre, v_pre)))
    weight = torch.sigmoid(lse_pre - lse_own).unsqueeze(-1).to(own.dtype)
    return torch.lerp(own, pre, weight)


class Block(nn.Module):
    """Pre-LN transformer block (timm ``Block`` names: norm1, attn, norm2, mlp)."""

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int, eps: float, act: str, prefix_mode: str = "auto"):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, prefix_mode)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, mlp_hidden, act=act)

    def forward(self, x, kv_prefix=None, return_kv: bool = False):
        attn_out, kv = self.attn(self.norm1(x), kv_prefix=kv_prefix, return_kv=return_kv)
        x = x + attn_out
        x = x + self.mlp(self.norm2(x))
        return x, kv


class PatchEmbed(nn.Module):
    """Conv patch embedding; ``embed_patches`` applies the same weights to pre-unfolded patches."""

    def __init__(self, in_chans: int, dim: int, patch: int):
        super().__init__()
        self.patch_size = patch
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)

    def embed_patches(self, patches: torch.Tensor) -> torch.Tensor:
        """(..., C*p*p) unfolded patches (channel-major, as ``F.unfold``) -> (..., dim)."""
        return F.linear(patches, self.proj.weight.flatten(1), self.proj.bias)


class AttentionPoolLatent(nn.Module):
    """MAP head: one learned latent query attends over the tokens (timm ``AttentionPoolLatent`` names)."""

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int, eps: float, act: str):
        super().__init__()
        self.num_heads = num_heads
        self.latent = nn.Parameter(torch.zeros(1, 1, dim))
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, dim * 2)
        self.proj = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, mlp_hidden, act=act)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``mask`` (B, N): tokens to pool over; an all-false row pools over every token."""
        b, n, c = x.shape
        d = c // self.num_heads
        q = self.q(self.latent.expand(b, -1, -1)).view(b, 1, self.num_heads, d).transpose(1, 2)
        k, v = self.kv(x).view(b, n, 2, self.num_heads, d).permute(2, 0, 3, 1, 4).unbind(0)
        attn_mask = None
        if mask is not None:
            mask = mask.bool() | ~mask.bool().any(dim=-1, keepdim=True)
            attn_mask = mask.view(b, 1, 1, n)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        out = self.proj(out.transpose(1, 2).reshape(b, 1, c))
        out = out + self.mlp(self.norm(out))
        return out[:, 0]


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channel dim of an NCHW tensor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    """ConvNeXt block; the layer scale is stored as ``weight`` (the reference's name for timm's gamma)."""

    def __init__(self, dim: int, kernel_size: int = 7, ls_init: float = 1e-6):
        super().__init__()
        self.conv_dw = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, 4 * dim)
        self.weight = nn.Parameter(torch.full((dim,), ls_init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv_dw(x).permute(0, 2, 3, 1)
        y = self.mlp(self.norm(y)).permute(0, 3, 1, 2)
        return x + y * self.weight.view(1, -1, 1, 1)


class ShallowConvNet(nn.Module):
    """High-res selection feature: stem conv (stride = kernel) + ConvNeXt blocks + 1x1 projection."""

    def __init__(self, hidden: int, out: int, depth: int, kernel_size: int):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, hidden, kernel_size=kernel_size, stride=kernel_size), LayerNorm2d(hidden, eps=1e-6)
        )
        self.blocks = nn.Sequential(*[ConvNeXtBlock(hidden) for _ in range(depth)])
        self.out_proj = nn.Conv2d(hidden, out, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_proj(self.blocks(self.stem(x)))
