"""One NF4 definition for QLoRA training and 4-bit serving (issue #13 s.7), and merge-lora's refusal of a pickled
adapter before torch or peft reads it.

The two sites used to differ (double quantisation on in QLoRA, off in serving): an adapter trained against one
set of NF4 weights was served on another. Building a ``BitsAndBytesConfig`` needs neither bitsandbytes nor a GPU,
so the settings are compared here with the support check stubbed out; the check itself is tested as it runs.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from vila_hd.errors import ConfigError
from vila_hd.model import quantization

FIELDS = ("load_in_4bit", "bnb_4bit_quant_type", "bnb_4bit_use_double_quant", "bnb_4bit_compute_dtype",
          "llm_int8_skip_modules")


def _settings(config) -> dict:
    return {name: getattr(config, name) for name in FIELDS}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_qlora_and_4bit_serving_quantise_alike(monkeypatch, dtype):
    from vila_hd.loading import _four_bit_config
    from vila_hd.train.lora import four_bit_config

    monkeypatch.setattr(quantization, "require_four_bit_support", lambda *a, **k: None)
    training = _settings(four_bit_config(dtype))
    serving = _settings(_four_bit_config(torch.device("cuda"), dtype))
    assert training == serving
    assert training["bnb_4bit_quant_type"] == "nf4" and training["bnb_4bit_use_double_quant"] is True
    assert training["bnb_4bit_compute_dtype"] == dtype
    assert set(training["llm_int8_skip_modules"]) == {"vision_tower", "mm_projector", "lm_head"}


def test_four_bit_needs_bitsandbytes_and_a_gpu_and_says_which_setting_asked():
    if torch.cuda.is_available():
        pytest.skip("the refusal is for machines without a CUDA GPU")
    from vila_hd.loading import _four_bit_config
    from vila_hd.train.lora import four_bit_config

    with pytest.raises(ConfigError, match=r"lora\.quantize=4bit \(QLoRA\) needs bitsandbytes and a CUDA GPU"):
        four_bit_config(torch.bfloat16)
    with pytest.raises(ConfigError, match=r"--load-4bit needs bitsandbytes and a CUDA GPU"):
        _four_bit_config(torch.device("cpu"), torch.bfloat16)


def test_merge_lora_refuses_an_adapter_with_only_pickled_weights(tmp_path):
    """The project's own refusal, before the base is loaded and before torch's weights-only unpickler runs."""
    pytest.importorskip("peft")
    from vila_hd.train.lora import merge_adapter

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": "x"}))
    (adapter / "adapter_model.bin").write_bytes(b"not read")
    out = tmp_path / "merged"
    with pytest.raises(OSError, match=r"only pickled weights \(adapter_model\.bin\).*adapter_model\.safetensors"):
        merge_adapter(str(adapter), str(out))
    assert not os.path.exists(out)
