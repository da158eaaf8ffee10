"""PS3 pre-training model: GT-forced selection, pooling rules, training modes, and a short run that learns."""

from __future__ import annotations

import itertools
import types

import pytest
import torch
import torch.nn.functional as F
from tolerances import assert_fp_close
from train_helpers import one_thread  # noqa: F401 (fixture)

from vila_hd.ps3 import PS3Tokenizer
from vila_hd.ps3.selection import StepSpec, resize_maps
from vila_hd.ps3.vision import PS3VisionModelOutput
from vila_hd.train.pretrain.data import BoxCaptionDataset, collate_box_caption
from vila_hd.train.pretrain.model import PS3ForPretraining, box_recall, pretrain_loss
from vila_hd.train.pretrain.synthetic import make_records, tiny_ps3_config, write_word_tokenizer

SIZE = 448  # scales 112 / 224 / 448: grids 8, 16, 32; budget 160 = [32, 128]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return PS3Tokenizer(str(write_word_tokenizer(tmp_path_factory.mktemp("tok"))), context_length=8, clean="canonicalize")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models on a shared 2-core machine


def tiny_model(seed: int = 0, **kwargs) -> PS3ForPretraining:
    torch.manual_seed(seed)
    return PS3ForPretraining(tiny_ps3_config(), **kwargs)


def random_batch(batch: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return {
        "pixel_values": torch.randint(0, 256, (batch, 3, SIZE, SIZE), generator=g, dtype=torch.uint8),
        "input_ids": torch.randint(3, 17, (batch, 8), generator=g),
        "boxes": torch.tensor([[56.0, 112.0, 168.0, 196.0], [0.0, 0.0, 448.0, 448.0], [280.0, 14.0, 448.0, 448.0]])[:batch],
        "is_global": torch.tensor([False, True, False])[:batch],
    }


@torch.no_grad()
def test_gt_box_patches_are_selected_before_any_other():
    """Boxes on 28-px cells (the first high-res grid): the forced region is exactly the box at every scale."""
    model = tiny_model().eval()
    batch = random_batch()
    out = model(**batch)
    budget = model.config.vision_config.budget_each_scale
    for scale, (sel, gt_grid) in enumerate(zip(out.selection_maps, (16, 32))):
        assert int(sel[0].sum()) == budget[scale]
        for i in (0, 2):
            x0, y0, x1, y1 = (int(v * gt_grid / SIZE) for v in batch["boxes"][i])
            box = torch.zeros(gt_grid, gt_grid, dtype=torch.bool)
            box[y0:y1, x0:x1] = True
            n_box, n_sel = int(box.sum()), int(sel[i].sum())
            inside = int(sel[i][box].sum())
            assert inside == min(n_box, n_sel), (scale, i)  # box first: all of it, or only box patches
            assert n_sel < n_box or n_box < budget[scale]  # the test covers both cases
            gt = F.interpolate(out.gt_maps[i : i + 1, None], size=(gt_grid,) * 2, mode="area")[0, 0] > 0
            assert torch.equal(gt, box)
    # without GT forcing the top-down probabilities alone decide
    free = tiny_model(select_with_gt=False, pool_gt_token_only=False).eval()(**batch)
    assert not torch.equal(free.selection_maps[1][0], out.selection_maps[1][0])


@torch.no_grad()
def test_global_captions_use_the_low_res_pooled_vector():
    model = tiny_model().eval()
    batch = random_batch()
    out = model(**batch)
    low = model.vision_model.encode_low_res(model.normalize_pixels(batch["pixel_values"]))
    expected = F.normalize(model.vision_model.trunk.pool(low.hidden_states[-1]), dim=-1)
    assert_fp_close(out.image_features[1], expected[1])
    assert not torch.allclose(out.image_features[0], expected[0], atol=1e-3)
    text = model.text_model(batch["input_ids"])
    assert_fp_close(out.text_features, F.normalize(text.pooled_output, dim=-1))
    # top-down probabilities come from each sample's own caption: swapping captions swaps them
    swapped = model(**{**batch, "input_ids": batch["input_ids"].flip(0)})
    assert_fp_close(swapped.topdown_probs[0][0], model(**{**batch, "input_ids": batch["input_ids"][[2, 1, 0]]}).topdown_probs[0][0])
    assert not torch.allclose(swapped.topdown_probs[0][0], out.topdown_probs[0][0])


def masked_gt_tokens(gt, maps):
    """The GT map read at the selected patches, by boolean-mask indexing (as the encoder did before)."""
    gts = resize_maps(gt, [tuple(m.shape[-2:]) for m in maps], mode="area")
    flat_gt = torch.cat([g.flatten(1) for g in gts], dim=1)
    flat_sel = torch.cat([m.flatten(1) for m in maps], dim=1).bool()
    return flat_gt[flat_sel].view(flat_sel.shape[0], -1) > 0


def forward_pooled_all_high_res(self, low, prompt=None, gt_selection_maps=None, is_global_text=None,
                                pool_gt_token_only=False, num_token_look_close=None, smooth_selection_prob=False):
    """The encoder's pooled path as it was: the high-res step on every sample, the global ones' result dropped."""
    step_budget = sum(self.config.budget_each_scale)
    tokens = num_token_look_close if num_token_look_close is not None and num_token_look_close <= step_budget else None
    plan = self.plan(low.pixel_values, steps=[StepSpec(tokens=tokens)])
    probs, bottom_up, top_down = self._scores(low, prompt, gt_selection_maps, smooth_selection_prob)
    step_maps = self._select(probs, plan, 1)
    high = self._encode_selected(low, step_maps, plan, [self.config.num_hidden_layers - 1])[0]
    mask = masked_gt_tokens(gt_selection_maps, step_maps[0]) if pool_gt_token_only else None
    pooled = self.trunk.pool(high, mask)
    if is_global_text is not None:
        low_pooled = self.trunk.pool(low.hidden_states[-1])
        pooled = torch.where(is_global_text.view(-1, 1).bool(), low_pooled, pooled)
    return PS3VisionModelOutput(pooled_output=pooled, selection_maps=step_maps[0], selection_probs=probs,
                                bottomup_selection_probs=bottom_up, topdown_selection_probs=top_down)


def high_res_batch_sizes(model: PS3ForPretraining) -> list[int]:
    """Records the batch of every high-res (K/V-prefixed) call of the first trunk block."""
    sizes = []
    model.vision_model.trunk.blocks[0].register_forward_pre_hook(
        lambda _, args: sizes.append(args[0].shape[0]) if args[1] is not None else None
    )
    return sizes


def loss_and_grads(model: PS3ForPretraining, batch: dict):
    out = model(**batch)
    loss, _ = pretrain_loss(out)
    loss.backward()
    return out, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("is_global, high_res_batch", [
    ([False, True, False], 2), ([True, False, True], 1), ([True, True, True], 1), ([False, False, False], 3),
])
def test_global_captions_skip_the_high_res_step(is_global, high_res_batch):
    """Only local-caption samples run the high-res step (an all-global batch runs one as a weight-0 dummy, so
    every parameter still gets a gradient); features, selection maps and probabilities, the loss and every
    gradient equal those of the old path that ran it on every sample."""
    batch = {**random_batch(), "is_global": torch.tensor(is_global)}
    new, old = tiny_model(), tiny_model()
    sizes = high_res_batch_sizes(new)
    old.vision_model.forward_pooled = types.MethodType(forward_pooled_all_high_res, old.vision_model)
    (out, grads), (ref, ref_grads) = loss_and_grads(new, batch), loss_and_grads(old, batch)
    assert sizes == [high_res_batch]
    assert_fp_close(out.image_features, ref.image_features)
    assert torch.isfinite(out.image_features).all() and out.image_features.shape == (3, 32)
    for name in ("selection_maps", "bottomup_probs", "topdown_probs"):
        for a, b in zip(getattr(out, name), getattr(ref, name), strict=True):
            assert_fp_close(a, b, msg=name)
    assert grads.keys() == ref_grads.keys() == {n for n, p in new.named_parameters() if p.requires_grad}
    for name, grad in grads.items():
        assert_fp_close(grad, ref_grads[name], msg=name)


@torch.no_grad()
def test_global_caption_skip_with_merged_prefix_attention():
    """The subset's K/V prefix also feeds the log-sum-exp merge (inference without gradients)."""
    batch = {**random_batch(), "is_global": torch.tensor([True, False, False])}
    new, old = tiny_model().eval(), tiny_model().eval()
    old.vision_model.forward_pooled = types.MethodType(forward_pooled_all_high_res, old.vision_model)
    for model in (new, old):
        model.vision_model.set_prefix_attention("merge")
    assert_fp_close(new(**batch).image_features, old(**batch).image_features)


def test_selection_only_training_touches_only_selection_modules():
    model = tiny_model()
    trainable = model.train_only_selection()
    assert trainable and all(
        n.startswith(("text_model.prompt_proj.", "vision_model.selection_feature_proj.", "vision_model.prior_prompt",
                      "vision_model.highres_selection_feature_module.", "vision_model.prompt_proj_for_highres."))
        for n in trainable
    )
    out = model(**random_batch())
    assert out.image_features is None  # no gradient could reach the trainable set through the top-k
    loss, metrics = pretrain_loss(out)
    loss.backward()
    assert "siglip" not in metrics
    for name, param in model.named_parameters():
        assert (param.grad is not None) == (name in trainable), name


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for ckpt in (False, True):
        model = tiny_model()
        model.set_gradient_checkpointing(ckpt)
        loss, _ = pretrain_loss(model(**random_batch()))
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and "logit_bias" in grads[0]
    for name in grads[0]:
        assert_fp_close(grads[0][name], grads[1][name], msg=name)


def test_bad_inputs_name_the_culprit():
    model = tiny_model()
    batch = random_batch()
    with pytest.raises(ValueError, match="boxes must have batch size 3"):
        model(**{**batch, "boxes": batch["boxes"][:2]})
    with pytest.raises(ValueError, match="pixel_values must be uint8 or floating point"):
        model(**{**batch, "pixel_values": batch["pixel_values"].long()})
    with pytest.raises(ValueError, match="tokens_per_step=200 must lie in"):
        PS3ForPretraining(tiny_ps3_config(), tokens_per_step=200)
    with pytest.raises(ValueError, match="pool_gt_token_only=True needs select_with_gt=True"):
        PS3ForPretraining(tiny_ps3_config(), select_with_gt=False)
    cfg = tiny_ps3_config()
    cfg.text_config.output_dim = 16
    with pytest.raises(ValueError, match="output_dim=16"):
        PS3ForPretraining(cfg)


def test_short_run_learns_top_down_selection(tokenizer):
    """Loss falls on the training batch and top-down selection finds the captioned box far above chance."""
    torch.manual_seed(0)
    model = tiny_model()
    train = BoxCaptionDataset(make_records(48, seed=0), tokenizer, SIZE, global_caption_prob=0.25)
    held_out = BoxCaptionDataset(make_records(24, seed=1), tokenizer, SIZE, global_caption_prob=0.0)
    loader = torch.utils.data.DataLoader(train, batch_size=8, shuffle=True, collate_fn=collate_box_caption,
                                         drop_last=True, generator=torch.Generator().manual_seed(0))
    fixed = collate_box_caption([train[i] for i in range(8)])
    test_batch = collate_box_caption([held_out[i] for i in range(len(held_out))])

    @torch.no_grad()
    def evaluate():
        model.eval()
        loss = pretrain_loss(model(**fixed))[1]["loss"]
        out = model(**test_batch)
        model.train()
        return loss, [box_recall(out.topdown_probs, out.gt_maps, out.is_global, s) for s in (0, 1)]

    loss_before, recall_before = evaluate()
    optimizer = torch.optim.AdamW(model.param_groups(1e-4), lr=5e-3)
    step, epoch = 0, 0
    while step < 30:
        train.set_epoch(epoch)
        for batch in itertools.islice(loader, 30 - step):
            loss, _ = pretrain_loss(model(**batch))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
        epoch += 1
    loss_after, recall_after = evaluate()
    assert loss_after < 0.5 * loss_before, (loss_before, loss_after)
    for (before, chance), (after, _) in zip(recall_before, recall_after):
        assert after > 2.5 * chance and after > before + 0.05, (before, after, chance)


def test_box_recall_counts_box_patches_among_the_top_k():
    gt = torch.zeros(3, 8, 8)
    gt[:, 2:4, 2:6] = 1  # 8 of 64 patches
    perfect = gt.clone() + 0.01 * torch.rand(3, 8, 8)
    probs = [torch.stack([perfect[0], 1 - perfect[1], perfect[2]])]
    recall, chance = box_recall(probs, gt, torch.tensor([False, False, True]))
    assert recall == pytest.approx(0.5) and chance == pytest.approx(8 / 64)  # sample 0 all hits, 1 none, 2 global
    assert box_recall(probs, gt, torch.ones(3, dtype=torch.bool)) is None


@pytest.mark.parametrize(("is_global", "skipped"), [([False, False, False], 0), ([False, True, False], 1),
                                                     ([True, True, True], 2)])
def test_flops_leave_out_the_high_res_step_of_global_captions(is_global, skipped):
    """MFU counts the work done: a global-caption image skips the high-res step (one still runs, as a dummy, when
    every caption is global); selection-only training counts no high-res step at all."""
    from vila_hd.train.pretrain.loop import pretrain_flops

    model = tiny_model()
    vision = model.config.vision_config
    batch = {"pixel_values": torch.zeros(3, 3, 8, 8), "is_global": torch.tensor(is_global)}
    params = sum(p.numel() for n, p in model.vision_model.trunk.named_parameters()
                 if n.startswith(("blocks.", "patch_embed.")))
    low, step = vision.low_res_token_num, sum(vision.budget_each_scale)
    high_res = 6.0 * params * step + 3.0 * 4 * vision.num_hidden_layers * vision.hidden_size * step * (low + step)
    everything = pretrain_flops(model)({**batch, "is_global": torch.zeros(3, dtype=torch.bool)})
    assert pretrain_flops(model)(batch) == pytest.approx(everything - skipped * high_res, rel=1e-12)
    model.train_only_selection()
    selection_only = pretrain_flops(model)
    assert selection_only(batch) == selection_only({**batch, "is_global": torch.zeros(3, dtype=torch.bool)})
