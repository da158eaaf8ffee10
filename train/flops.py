"""Model FLOPs of a VILA-HD training micro-batch (for MFU), with the convention stated.

- LLM: ``f * N_llm * T + f * N_head * T_target`` (``N_llm`` = LLM parameters without the input embedding and
  the LM head, ``T`` = tokens that are not padding, ``N_head`` = vocabulary x width, tied or not, counted at
  the ``T_target`` target tokens where the training step runs it; ``f`` = 6 when the LLM is trained, 4 when
  only its input gradient is needed (a frozen LLM behind a trainable projector), 2 forward-only) + attention
  ``(f / 2) * 4 * L * d * sum(s_i^2)`` over the samples (full-attention convention, as PaLM and torchtitan
  count it; not halved for causality).
- Top-down prefix pass (no gradient, no LM head): ``2 * N_llm`` per prefix token + its attention.
- PS3: ``f_v * N_v`` per processed patch (low-res + selected high-res patches; ``N_v`` = trunk blocks and
  patch embedding) + attention of the low-res pass (``s^2``) and of the high-res tokens against the low-res
  K/V plus their own step; ``f_v`` = 6 when the vision tower is trained, else 2.
Projector, prompt head and selection modules are not counted (small).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class FlopsModel:
    llm_params: int
    llm_layers: int
    llm_width: int  # attention width (heads x head dim)
    vision_params: int
    vision_layers: int
    vision_width: int
    low_res_patches: int
    selected_patches: int  # per image
    patches_per_step: int
    downsample: int = 2
    llm_factor: float = 6.0
    vision_factor: float = 6.0
    head_params: int = 0  # LM head (vocabulary x width), run at the target tokens only

    @classmethod
    def from_model(cls, model, layout, llm_factor: float = 6.0, vision_factor: float = 6.0) -> FlopsModel:
        text = model.config.text_config
        vision = model.config.vision_config
        embed = model.get_input_embeddings().weight
        head = model.language_model.get_output_embeddings().weight
        untied_head = head.numel() if head is not embed else 0
        llm = sum(p.numel() for p in model.language_model.parameters()) - embed.numel() - untied_head
        trunk = model.vision_tower.vision_model.trunk
        vis = sum(p.numel() for n, p in trunk.named_parameters() if n.startswith(("blocks.", "patch_embed.")))
        heads = text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        return cls(
            llm_params=int(llm), llm_layers=text.num_hidden_layers, llm_width=heads * head_dim,
            vision_params=int(vis), vision_layers=vision.num_hidden_layers, vision_width=vision.hidden_size,
            low_res_patches=vision.low_res_grid**2, selected_patches=layout.num_selected_patches,
            patches_per_step=max(sum(vision.budget_each_scale), 1), downsample=model.config.downsample,
            llm_factor=llm_factor, vision_factor=vision_factor, head_params=int(head.numel()),
        )

    def llm(self, seq_lengths: list[int], factor: float, targets: int = 0) -> float:
        """The LLM over these samples, its head at ``targets`` tokens."""
        tokens = sum(seq_lengths)
        attention = 4.0 * self.llm_layers * self.llm_width * sum(s * s for s in seq_lengths)
        return factor * (self.llm_params * tokens + self.head_params * targets) + factor / 2 * attention

    def vision(self, num_images: int) -> float:
        lo, sel, step = self.low_res_patches, self.selected_patches, min(self.patches_per_step, self.selected_patches)
        dense = self.vision_factor * self.vision_params * (lo + sel)
        attention = 4.0 * self.vision_layers * self.vision_width * (lo * lo + sel * (lo + step))
        return num_images * (dense + self.vision_factor / 2 * attention)

    def batch(self, batch: dict, prefix: bool = True) -> float:
        """FLOPs of one collated micro-batch (see the module docstring)."""
        total = self.llm(batch["seq_lengths"], self.llm_factor, int(batch["num_items"]["lm"]))
        total += self.vision(int(batch["num_placed_images"]) or 0)
        if prefix and int(batch["num_placed_images"]):
            prompts = batch["prompt_index"]
            high = self.selected_patches // (self.downsample * self.downsample)
            # Prefix tokens: up to each row's last prompt, without high-res tokens (an estimate per row).
            rows = torch.unique(prompts[:, 0])
            lengths = []
            for r in rows.tolist():
                last = int(prompts[prompts[:, 0] == r, 1].max()) + 1
                n_img = int((prompts[:, 0] == r).sum())
                lengths.append(max(last - n_img * high, 1))
            total += self.llm(lengths, 2.0)
        return total
