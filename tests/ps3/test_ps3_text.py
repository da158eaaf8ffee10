"""PS3 text tower and tokenizer: key names, parity with independent implementations, tokenizer round trips."""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
import types
from collections import OrderedDict
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from tolerances import assert_fp_close
from torch import nn

from vila_hd.ps3.configuration import tiny_text_config
from vila_hd.ps3.text import PS3TextModelOutput, PS3TextTransformer
from vila_hd.ps3.tokenization import PS3Tokenizer, canonicalize_text

VARIANTS = {
    # What the released SigLIP2 text towers use: tanh GELU, bidirectional, last-token pooling, biased projection.
    "siglip2": dict(),
    # CLIP-style: causal mask, argmax (EOT) pooling, projection matrix without bias, exact GELU, layer scale.
    "clip_causal": dict(
        no_causal_mask=False, pool_type="argmax", proj_bias=False, act_kwargs={}, norm_kwargs={}, ls_init_value=0.3
    ),
    "first_token": dict(pool_type="first"),
}


def _randomize(module: nn.Module, seed: int = 0) -> None:
    """Perturb every parameter so that zero biases and unit LayerNorms do not hide wiring mistakes."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))


def _model(seed: int = 0, **overrides) -> PS3TextTransformer:
    torch.manual_seed(seed)
    model = PS3TextTransformer(tiny_text_config(**overrides)).eval()
    _randomize(model, seed)
    return model


def _input_ids(config, batch: int = 3, length: int | None = None, low: int = 0, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(max(low, 1), config.vocab_size, (batch, length or config.context_length), generator=gen)
    if low == 0:
        ids[0, 5:] = 0  # a padded row
    return ids


# --- independent references -----------------------------------------------------------------------------------------
class RefPromptProj(nn.Module):
    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.fc1, self.norm, self.fc2 = nn.Linear(in_dim, dim), nn.LayerNorm(dim, eps=1e-5), nn.Linear(dim, dim)

    def forward(self, x):
        return self.fc2(self.norm(F.gelu(self.fc1(x))))


class RefBlock(nn.Module):
    """open_clip's ResidualAttentionBlock, written against nn.MultiheadAttention."""

    def __init__(self, cfg):
        super().__init__()
        width, hidden = cfg.width, int(cfg.width * cfg.mlp_ratio)
        self.ln_1 = nn.LayerNorm(width, **cfg.norm_kwargs)
        self.attn = nn.MultiheadAttention(width, cfg.heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(width, **cfg.norm_kwargs)
        act = nn.GELU(**cfg.act_kwargs)
        self.mlp = nn.Sequential(OrderedDict(c_fc=nn.Linear(width, hidden), gelu=act, c_proj=nn.Linear(hidden, width)))
        if cfg.ls_init_value is not None:
            self.ls_1, self.ls_2 = nn.Module(), nn.Module()
            self.ls_1.gamma = nn.Parameter(torch.ones(width))
            self.ls_2.gamma = nn.Parameter(torch.ones(width))
        else:
            self.ls_1 = self.ls_2 = None

    def forward(self, x, mask):
        h = self.ln_1(x)
        a = self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        x = x + (a * self.ls_1.gamma if self.ls_1 is not None else a)
        m = self.mlp(self.ln_2(x))
        return x + (m * self.ls_2.gamma if self.ls_2 is not None else m)


class RefTextTower(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.zeros(cfg.context_length, cfg.width))
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.ModuleList([RefBlock(cfg) for _ in range(cfg.layers)])
        self.ln_final = nn.LayerNorm(cfg.width, **cfg.norm_kwargs)
        if cfg.proj_bias:
            self.text_projection = nn.Linear(cfg.width, cfg.output_dim)
        else:
            self.text_projection = nn.Parameter(torch.zeros(cfg.width, cfg.output_dim))

    def forward(self, ids):
        length = ids.shape[1]
        x = self.token_embedding(ids) + self.positional_embedding[:length]
        mask = None if self.cfg.no_causal_mask else nn.Transformer.generate_square_subsequent_mask(length)
        for block in self.transformer.resblocks:
            x = block(x, mask)
        x = self.ln_final(x)
        pool = self.cfg.pool_type
        rows = torch.arange(x.shape[0])
        x = {"first": x[:, 0], "last": x[:, -1], "argmax": x[rows, ids.argmax(-1)], "none": x}[pool]
        return self.text_projection(x) if self.cfg.proj_bias else x @ self.text_projection


def _load_open_clip_transformer():
    """Import open_clip's transformer.py on its own.

    The open_clip package __init__ imports torchvision (for its image transforms), which a CPU-only torch install
    may lack; the text transformer itself needs only torch, numpy and two helpers from open_clip.utils.
    """
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("open_clip_torch is not installed")
    name = "_ps3_test_open_clip"
    if f"{name}.transformer" not in sys.modules:
        package = types.ModuleType(name)
        package.__path__ = list(spec.submodule_search_locations)
        utils = types.ModuleType(f"{name}.utils")
        utils.to_2tuple = lambda x: tuple(x) if isinstance(x, (tuple, list)) else (x, x)
        utils.feature_take_indices = None  # used by the vision tower only
        sys.modules[name], sys.modules[f"{name}.utils"] = package, utils
    return importlib.import_module(f"{name}.transformer")


def _open_clip_tower(cfg):
    oc = _load_open_clip_transformer()
    return oc.TextTransformer(
        context_length=cfg.context_length,
        vocab_size=cfg.vocab_size,
        width=cfg.width,
        heads=cfg.heads,
        layers=cfg.layers,
        mlp_ratio=cfg.mlp_ratio,
        ls_init_value=cfg.ls_init_value,
        output_dim=cfg.output_dim,
        embed_cls=cfg.embed_cls,
        no_causal_mask=cfg.no_causal_mask,
        pad_id=cfg.pad_id,
        pool_type=cfg.pool_type,
        proj_bias=cfg.proj_bias,
        act_layer=partial(nn.GELU, **cfg.act_kwargs),
        norm_layer=partial(oc.LayerNorm, **cfg.norm_kwargs),
    ).eval()


def _copy_weights(model: PS3TextTransformer, tower: nn.Module) -> RefPromptProj:
    """Load our weights into an independent tower (+ prompt MLP) by key name; every key must match."""
    ours = model.state_dict()
    prompt = RefPromptProj(model.config.output_dim, model.config.prompt_proj_dim)
    prompt_sd = {k.removeprefix("prompt_proj."): v for k, v in ours.items() if k.startswith("prompt_proj.")}
    tower_sd = {k: v for k, v in ours.items() if not k.startswith("prompt_proj.")}
    assert set(tower.state_dict()) == set(tower_sd), set(tower.state_dict()) ^ set(tower_sd)
    tower.load_state_dict(tower_sd, strict=True)
    prompt.load_state_dict(prompt_sd, strict=True)
    return prompt


def _assert_parity(model, tower, prompt_proj, ids):
    with torch.no_grad():
        out = model(ids)
        ref_pooled = tower(ids)
        ref_prompt = prompt_proj(F.normalize(ref_pooled, dim=-1))
    assert_fp_close(out.pooled_output, ref_pooled)
    assert_fp_close(out.prompt, ref_prompt)


# --- model tests ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_parity_with_open_clip(variant):
    model = _model(**VARIANTS[variant])
    tower = _open_clip_tower(model.config)
    prompt_proj = _copy_weights(model, tower)
    _assert_parity(model, tower, prompt_proj, _input_ids(model.config))


def test_parity_with_open_clip_class_token():
    # CoCa-style appended class token. open_clip 3.x masks padded keys for every query, the PS3 reference (legacy
    # open_clip) only for the class query; the two agree without padding, and with padding when there is one
    # layer (the pooled class query then sees unmasked inputs either way).
    model = _model(embed_cls=True, no_causal_mask=False, pool_type="argmax")
    tower = _open_clip_tower(model.config)
    prompt_proj = _copy_weights(model, tower)
    _assert_parity(model, tower, prompt_proj, _input_ids(model.config, low=1))

    model = _model(embed_cls=True, no_causal_mask=False, layers=1)
    tower = _open_clip_tower(model.config)
    prompt_proj = _copy_weights(model, tower)
    ids = _input_ids(model.config)
    assert (ids == model.config.pad_id).any()
    _assert_parity(model, tower, prompt_proj, ids)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_parity_with_multihead_attention_reference(variant):
    model = _model(**VARIANTS[variant])
    tower = RefTextTower(model.config).eval()
    prompt_proj = _copy_weights(model, tower)
    _assert_parity(model, tower, prompt_proj, _input_ids(model.config))
    # Shorter than the context: positions and the causal mask are cut to the input length.
    _assert_parity(model, tower, prompt_proj, _input_ids(model.config, length=7))


def test_state_dict_keys():
    model = PS3TextTransformer(tiny_text_config(layers=2))
    block = [
        "ln_1.weight",
        "ln_1.bias",
        "attn.in_proj_weight",
        "attn.in_proj_bias",
        "attn.out_proj.weight",
        "attn.out_proj.bias",
        "ln_2.weight",
        "ln_2.bias",
        "mlp.c_fc.weight",
        "mlp.c_fc.bias",
        "mlp.c_proj.weight",
        "mlp.c_proj.bias",
    ]
    expected = {"token_embedding.weight", "positional_embedding", "ln_final.weight", "ln_final.bias"}
    expected |= {f"transformer.resblocks.{i}.{name}" for i in range(2) for name in block}
    expected |= {"text_projection.weight", "text_projection.bias"}
    expected |= {f"prompt_proj.{m}.{p}" for m in ("fc1", "norm", "fc2") for p in ("weight", "bias")}
    assert set(model.state_dict()) == expected
    assert model.prompt_proj.norm.eps == 1e-5

    no_bias = PS3TextTransformer(tiny_text_config(layers=2, proj_bias=False, ls_init_value=0.1, embed_cls=True))
    keys = set(no_bias.state_dict())
    assert "text_projection" in keys and "text_projection.weight" not in keys
    assert no_bias.state_dict()["text_projection"].shape == (32, 32)
    assert {"cls_emb", "transformer.resblocks.1.ls_1.gamma", "transformer.resblocks.1.ls_2.gamma"} <= keys
    assert no_bias.positional_embedding.shape == (17, 32)  # one extra position for the class token


def test_output_shapes_and_init():
    cfg = tiny_text_config(output_dim=24, prompt_proj_dim=40)
    model = PS3TextTransformer(cfg).eval()
    out = model(_input_ids(cfg, batch=2))
    assert isinstance(out, PS3TextModelOutput)
    assert out.pooled_output.shape == (2, 24) and out.prompt.shape == (2, 40)
    assert out.last_hidden_state.shape == (2, cfg.context_length, cfg.width)
    assert out[0] is out.pooled_output
    assert model.token_embedding.weight.std().item() == pytest.approx(0.02, rel=0.2)
    assert model.positional_embedding.std().item() == pytest.approx(0.01, rel=0.3)
    assert torch.count_nonzero(model.text_projection.bias) == 0


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_meta_device_build_then_load_matches(variant):
    # How transformers' from_pretrained materialises a model: built on meta, emptied, then the state dict loaded.
    # Nothing the forward needs may live outside the state dict.
    model = _model(**VARIANTS[variant])
    with torch.device("meta"):
        empty = PS3TextTransformer(model.config)
    empty = empty.to_empty(device="cpu").eval()
    empty.load_state_dict(model.state_dict(), strict=True)
    ids = _input_ids(model.config)
    with torch.no_grad():
        torch.testing.assert_close(empty(ids).prompt, model(ids).prompt, atol=0, rtol=0)


def test_gradient_checkpointing_matches():
    model = _model().train()
    ids = _input_ids(model.config)
    grads = []
    for enabled in (False, True):
        model.gradient_checkpointing = enabled
        model.zero_grad()
        out = model(ids)
        (out.prompt.square().sum() + out.pooled_output.sum()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, grad in grads[0].items():
        assert_fp_close(grads[1][name], grad, msg=name)


@pytest.mark.parametrize(
    "bad",
    [
        torch.zeros(2, 17, dtype=torch.long),  # longer than context_length=16
        torch.zeros(16, dtype=torch.long),  # 1-D
        torch.zeros(2, 16),  # float
    ],
)
def test_rejects_bad_input_ids(bad):
    model = PS3TextTransformer(tiny_text_config())
    with pytest.raises(ValueError, match="input_ids") as err:
        model(bad)
    assert str(tuple(bad.shape)) in str(err.value)


# --- tokenizer tests --------------------------------------------------------------------------------------------------
WORDS = "a red boat green rope on the and tall spire with cross at top of building".split()


@pytest.fixture(scope="module")
def hf_tokenizer_dir(tmp_path_factory):
    """A real (tiny) Hugging Face fast tokenizer: word level, pad id 0, [SEP] appended."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, "[SEP]": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="$A [SEP]", special_tokens=[("[SEP]", 2)])
    fast = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", sep_token="[SEP]")
    path = tmp_path_factory.mktemp("hf_tokenizer")
    fast.save_pretrained(path)
    return path


def test_canonicalize_text():
    assert canonicalize_text("  A Red,  Boat!_on the   sea. ") == "a red boat on the sea"


def test_tokenizer_pads_and_canonicalizes(hf_tokenizer_dir):
    tok = PS3Tokenizer(tokenizer_name=str(hf_tokenizer_dir), context_length=16, clean="canonicalize")
    ids = tok(["A Red, Boat!", "a red boat"])
    assert ids.shape == (2, 16) and ids.dtype == torch.long
    assert torch.equal(ids[0], ids[1])
    assert ids[0, :4].tolist() == [3, 4, 5, 2]  # a red boat [SEP]
    assert ids[0, 4:].eq(0).all()
    assert tok("a red boat").shape == (1, 16)
    assert tok(" ".join(WORDS * 3)).shape == (1, 16)  # truncated
    assert tok("a red boat", context_length=6).shape == (1, 6)
    stripped = PS3Tokenizer(str(hf_tokenizer_dir), context_length=16, clean="canonicalize", strip_sep_token=True)
    assert stripped("a red boat")[0, :4].tolist() == [3, 4, 5, 0]
    # Its output feeds the text tower directly.
    out = PS3TextTransformer(tiny_text_config()).eval()(ids)
    assert out.prompt.shape == (2, 32)


def test_tokenizer_save_and_load_round_trip(hf_tokenizer_dir, tmp_path):
    tok = PS3Tokenizer(tokenizer_name=str(hf_tokenizer_dir), context_length=16, clean="canonicalize")
    path = tok.save_pretrained(tmp_path / "ps3")
    saved = json.loads(open(path).read())
    assert saved == {
        "tokenizer_name": str(hf_tokenizer_dir),
        "context_length": 16,
        "clean": "canonicalize",
        "strip_sep_token": False,
        "language": None,
    }
    loaded = PS3Tokenizer.from_pretrained(tmp_path / "ps3")
    assert loaded.init_kwargs == tok.init_kwargs
    assert torch.equal(loaded(["a red boat", "Tall spire!"]), tok(["a red boat", "Tall spire!"]))
    assert PS3Tokenizer.from_pretrained(tmp_path / "ps3", context_length=8).context_length == 8


def test_tokenizer_reads_released_formats(hf_tokenizer_dir, tmp_path):
    # Released tokenizer_config.json: tokenizer_name, context_length and the tokenizer_kwargs flattened in.
    released = tmp_path / "released"
    released.mkdir()
    (released / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_name": str(hf_tokenizer_dir), "context_length": 16, "clean": "canonicalize"})
    )
    assert PS3Tokenizer.from_pretrained(str(released)).init_kwargs["clean"] == "canonicalize"
    # Only a PS3 config.json: the tokenizer comes from its text_config.
    only_config = tmp_path / "only_config"
    only_config.mkdir()
    text_config = {
        "hf_tokenizer_name": str(hf_tokenizer_dir),
        "context_length": 12,
        "tokenizer_kwargs": {"clean": "canonicalize"},
    }
    (only_config / "config.json").write_text(json.dumps({"model_type": "ps3", "text_config": text_config}))
    tok = PS3Tokenizer.from_pretrained(str(only_config))
    assert (tok.context_length, tok.clean) == (12, "canonicalize")
    assert tok("A Red, Boat!").shape == (1, 12)
    from_config = PS3Tokenizer.from_config(tiny_text_config(hf_tokenizer_name=str(hf_tokenizer_dir)))
    assert from_config.init_kwargs["context_length"] == 16 and from_config.clean == "canonicalize"


def test_tokenizer_hub_id_downloads_config(hf_tokenizer_dir, tmp_path, monkeypatch):
    import huggingface_hub

    hub_files = tmp_path / "hub"
    hub_files.mkdir()
    (hub_files / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_name": str(hf_tokenizer_dir), "context_length": 16, "clean": "canonicalize"})
    )
    calls = []

    def fake_download(repo_id, filename, **kwargs):
        calls.append((repo_id, filename, kwargs))
        return str(hub_files / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    tok = PS3Tokenizer.from_pretrained("nvidia/PS3-1.5K-SigLIP2", revision="main")
    assert calls == [("nvidia/PS3-1.5K-SigLIP2", "tokenizer_config.json", {"revision": "main"})]
    assert tok.context_length == 16


def test_tokenizer_missing_local_path_never_tries_hub(tmp_path, monkeypatch):
    import huggingface_hub

    def no_hub(*args, **kwargs):
        raise AssertionError("the Hub must not be tried for a local path")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_hub)
    for missing in (str(tmp_path / "missing"), "./no/such/dir", "../nowhere", "~/no-such-ps3-dir"):
        with pytest.raises(FileNotFoundError, match="no-such-ps3-dir|missing|no/such/dir|nowhere") as err:
            PS3Tokenizer.from_pretrained(missing)
        assert missing in str(err.value)


def test_tokenizer_refuses_remote_code(hf_tokenizer_dir):
    with pytest.raises(ValueError, match="trust_remote_code"):
        PS3Tokenizer(str(hf_tokenizer_dir), trust_remote_code=True)
    with pytest.raises(ValueError, match="clean"):
        PS3Tokenizer(str(hf_tokenizer_dir), clean="nope")
