"""PS3 text tower: an open_clip-style text transformer that turns a caption into a top-down selection prompt.

The module layout (and so the state-dict keys) follows open_clip's ``TextTransformer`` so that the released
``text_model.*`` weights load unchanged: ``token_embedding``, ``positional_embedding``,
``transformer.resblocks.N.{ln_1, attn.in_proj_weight, attn.in_proj_bias, attn.out_proj, ln_2, mlp.c_fc,
mlp.c_proj}``, ``ln_final``, ``text_projection`` and the PS3 addition ``prompt_proj.{fc1, norm, fc2}``.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.utils import ModelOutput

from .configuration import PS3TextConfig

__all__ = ["PS3TextModelOutput", "PS3TextTransformer"]


@dataclass
class PS3TextModelOutput(ModelOutput):
    """Output of the PS3 text tower.

    Args:
        pooled_output: (B, output_dim) projected caption embedding (the contrastive text feature).
            With ``pool_type='none'`` it is (B, L, output_dim).
        prompt: (B, prompt_proj_dim) top-down selection prompt for the PS3 vision model.
        last_hidden_state: (B, L, width) token features, after ``ln_final`` unless the config pools
            before the final norm (``final_ln_after_pool`` or ``embed_cls``).
    """

    pooled_output: torch.FloatTensor | None = None
    prompt: torch.FloatTensor | None = None
    last_hidden_state: torch.FloatTensor | None = None


class LayerNorm(nn.LayerNorm):
    """LayerNorm whose output keeps the input dtype, also under autocast (as open_clip's)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps).to(x.dtype)


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_value: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_value)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class SelfAttention(nn.Module):
    """Multi-head self-attention with ``nn.MultiheadAttention``'s parameter layout, run through SDPA."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"text width={width} is not divisible by heads={heads}")
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        batch, length, width = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        # in_proj rows are [q; k; v], each split into heads of width // heads consecutive features.
        q, k, v = qkv.view(batch, length, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, width))


class ResidualAttentionBlock(nn.Module):
    """Pre-LN transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x)), each optionally layer-scaled."""

    def __init__(self, config: PS3TextConfig):
        super().__init__()
        width = config.width
        hidden = int(width * config.mlp_ratio)
        self.ln_1 = LayerNorm(width, **config.norm_kwargs)
        self.attn = SelfAttention(width, config.heads)
        self.ls_1 = LayerScale(width, config.ls_init_value) if config.ls_init_value is not None else nn.Identity()
        self.ln_2 = LayerNorm(width, **config.norm_kwargs)
        self.mlp = nn.Sequential(
            OrderedDict(
                [
                    ("c_fc", nn.Linear(width, hidden)),
                    ("gelu", nn.GELU(**config.act_kwargs)),
                    ("c_proj", nn.Linear(hidden, width)),
                ]
            )
        )
        self.ls_2 = LayerScale(width, config.ls_init_value) if config.ls_init_value is not None else nn.Identity()

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.ls_1(self.attn(self.ln_1(x), attn_mask))
        return x + self.ls_2(self.mlp(self.ln_2(x)))


class Transformer(nn.Module):
    """Container of the residual blocks (kept as a module so keys read ``transformer.resblocks.N``)."""

    def __init__(self, config: PS3TextConfig):
        super().__init__()
        self.width = config.width
        self.layers = config.layers
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(config) for _ in range(config.layers)])


class PromptProjection(nn.Module):
    """MLP mapping the normalized caption embedding to a PS3 prompt: fc1 -> GELU -> LayerNorm -> fc2."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, dim)
        self.act = nn.GELU()
        self.norm = nn.LayerNorm(dim)
        self.fc2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.norm(self.act(self.fc1(x))))


class PS3TextTransformer(nn.Module):
    """The PS3 text tower (plain PyTorch). ``forward(input_ids)`` returns a :class:`PS3TextModelOutput`.

    Set ``gradient_checkpointing = True`` to recompute each block in the backward pass while training.
    """

    def __init__(self, config: PS3TextConfig):
        super().__init__()
        if config.pool_type not in ("first", "last", "argmax", "none"):
            raise ValueError(f"pool_type must be one of first/last/argmax/none, got {config.pool_type!r}")
        self.config = config
        self.context_length = config.context_length
        self.num_pos = config.context_length + int(config.embed_cls)
        self.gradient_checkpointing = False

        self.token_embedding = nn.Embedding(config.vocab_size, config.width)
        # CoCa-style class token, appended after the text and always pooled when present.
        self.cls_emb = nn.Parameter(torch.empty(config.width)) if config.embed_cls else None
        self.positional_embedding = nn.Parameter(torch.empty(self.num_pos, config.width))
        self.transformer = Transformer(config)
        self.ln_final = LayerNorm(config.width, **config.norm_kwargs)
        if config.proj_bias:
            self.text_projection = nn.Linear(config.width, config.output_dim)
        else:
            self.text_projection = nn.Parameter(torch.empty(config.width, config.output_dim))
        self.prompt_proj = PromptProjection(config.output_dim, config.prompt_proj_dim)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialise parameters as open_clip / the PS3 reference do (prompt_proj keeps PyTorch's defaults)."""
        width, layers = self.config.width, self.config.layers
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        if self.cls_emb is not None:
            nn.init.normal_(self.cls_emb, std=0.01)
        attn_std = width**-0.5
        proj_std = width**-0.5 * (2 * layers) ** -0.5
        fc_std = (2 * width) ** -0.5
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.zeros_(block.attn.in_proj_bias)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.zeros_(block.attn.out_proj.bias)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        if isinstance(self.text_projection, nn.Linear):
            nn.init.normal_(self.text_projection.weight, std=width**-0.5)
            nn.init.zeros_(self.text_projection.bias)
        else:
            nn.init.normal_(self.text_projection, std=width**-0.5)
        for module in self.prompt_proj.modules():
            if isinstance(module, (nn.Linear, nn.LayerNorm)):
                module.reset_parameters()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """open_clip-compatible switch for :attr:`gradient_checkpointing`."""
        self.gradient_checkpointing = enable

    def _check_input_ids(self, input_ids: torch.Tensor) -> None:
        ok = (
            isinstance(input_ids, torch.Tensor)
            and input_ids.ndim == 2
            and not input_ids.is_floating_point()
            and not input_ids.is_complex()
            and input_ids.dtype != torch.bool
            and 0 < input_ids.shape[1] <= self.context_length
        )
        if not ok:
            if isinstance(input_ids, torch.Tensor):
                got = f"shape {tuple(input_ids.shape)} and dtype {input_ids.dtype}"
            else:
                got = type(input_ids).__name__
            raise ValueError(
                f"text (input_ids) must be a 2-D integer tensor of shape (batch, length) with "
                f"1 <= length <= context_length={self.context_length}; got {got}"
            )

    def _attention_mask(self, input_ids: torch.Tensor, seq_len: int, dtype: torch.dtype) -> torch.Tensor | None:
        if self.config.no_causal_mask:
            # The reference applies no padding/class mask in bidirectional mode, class token or not.
            return None
        # Built per call rather than kept as a buffer: non-persistent buffers are not restored when
        # transformers materialises a model from the meta device.
        mask = torch.full((seq_len, seq_len), float("-inf"), dtype=dtype, device=input_ids.device).triu_(1)
        if self.cls_emb is None:
            return mask
        # Legacy CoCa class mask (kept for checkpoint parity): text queries see every key (causally), the class
        # query's key validity is the text padding mask shifted right by one position.
        valid = F.pad(input_ids != self.config.pad_id, (1, 0), value=True)
        cls_row = torch.zeros(valid.shape, dtype=dtype, device=valid.device).masked_fill_(~valid, float("-inf"))
        extra = torch.zeros(input_ids.shape[0], 1, seq_len, seq_len, dtype=dtype, device=valid.device)
        extra[:, 0, -1] = cls_row
        return mask + extra

    def _pool(self, x: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        pool_type = self.config.pool_type
        if pool_type == "first":
            return x[:, 0]
        if pool_type == "last":
            return x[:, -1]
        if pool_type == "argmax":
            # CLIP-style: the end-of-text token has the largest id of the sequence.
            return x[torch.arange(x.shape[0], device=x.device), input_ids.argmax(dim=-1)]
        return x

    def forward(self, input_ids: torch.Tensor) -> PS3TextModelOutput:
        """Encode token ids (B, L), L <= context_length, into the caption embedding and the PS3 prompt."""
        self._check_input_ids(input_ids)
        dtype = (
            self.transformer.resblocks[0].mlp.c_fc.weight.dtype if self.config.layers else self.ln_final.weight.dtype
        )
        x = self.token_embedding(input_ids).to(dtype)
        if self.cls_emb is not None:
            x = torch.cat([x, self.cls_emb.to(dtype).expand(x.shape[0], 1, -1)], dim=1)
        seq_len = x.shape[1]
        x = x + self.positional_embedding[:seq_len].to(dtype)
        attn_mask = self._attention_mask(input_ids, seq_len, dtype)

        checkpointing = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.transformer.resblocks:
            x = checkpoint(block, x, attn_mask, use_reentrant=False) if checkpointing else block(x, attn_mask)

        if self.cls_emb is not None:
            # The appended class token overrides pool_type; the final norm is applied after pooling.
            pooled, tokens = self.ln_final(x[:, -1]), x[:, :-1]
        elif self.config.final_ln_after_pool:
            pooled, tokens = self.ln_final(self._pool(x, input_ids)), x
        else:
            tokens = self.ln_final(x)
            pooled = self._pool(tokens, input_ids)

        if isinstance(self.text_projection, nn.Linear):
            pooled = self.text_projection(pooled)
        else:
            pooled = pooled @ self.text_projection
        prompt = self.prompt_proj(F.normalize(pooled, dim=-1))
        return PS3TextModelOutput(pooled_output=pooled, prompt=prompt, last_hidden_state=tokens)
