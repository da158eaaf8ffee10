"""`vila-hd convert --to vila` writes the RoPE fields the transformers versions VILA pins read (rope_theta,
rope_scaling), not only transformers 5's rope_parameters: read by the legacy names, the exported LLM config
gives the source model's values."""

from __future__ import annotations

import json

import pytest

from vila_hd.compat.convert import convert

CASES = {
    "plain": {"rope_theta": 1e6},
    "linear": {"rope_theta": 1e6, "rope_scaling": {"rope_type": "linear", "factor": 2.0}},
    "yarn": {"rope_theta": 5e5, "rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                                                  "original_max_position_embeddings": 1024}},
}


def _legacy_rope(cfg: dict) -> tuple[float, str | None, float | None]:
    """(rope_theta, scaling type, factor) as transformers 4.46 / 4.56 read them: legacy field names only."""
    scaling = cfg.get("rope_scaling")
    kind = None if scaling is None else scaling.get("rope_type", scaling.get("type"))  # as 4.46 reads it
    return cfg["rope_theta"], kind, None if scaling is None else scaling.get("factor")


@pytest.mark.parametrize("case", sorted(CASES))
def test_vila_export_writes_legacy_rope_fields(tmp_path, case):
    from vila_hd.builder import build_tiny_model

    model, processor = build_tiny_model("tiny", text_overrides=CASES[case])
    src, dst = tmp_path / "src", tmp_path / "vila"
    model.save_pretrained(src, safe_serialization=True)
    processor.save_pretrained(src)
    source = model.language_model.config.rope_parameters
    expected = (source["rope_theta"], None if source["rope_type"] == "default" else source["rope_type"],
                source.get("factor"))
    assert expected[0] == CASES[case]["rope_theta"]

    convert(str(src), str(dst), "vila")

    llm = json.loads((dst / "llm" / "config.json").read_text())
    top = json.loads((dst / "config.json").read_text())["llm_cfg"]
    assert _legacy_rope(llm) == expected
    assert _legacy_rope(top) == expected
    if case == "yarn":
        assert llm["rope_scaling"]["original_max_position_embeddings"] == 1024
    # The export still loads back (transformers 5 reads rope_parameters) with the same RoPE.
    from vila_hd.model.modeling import load_vila_model

    back = load_vila_model(str(dst))
    assert back.language_model.config.rope_parameters == source
