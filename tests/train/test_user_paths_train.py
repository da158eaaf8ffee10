"""A new user's paths through the training commands (train, finetune-lora, merge-lora, data check): every
mistake is one error line naming the culprit, before anything slow runs; the commands say where their result is.

Most cases run in-process; a few through the installed ``vila-hd`` executable, as a user runs it."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import testpaths
from test_cli_errors import one_error_line, run_main
from train_helpers import fresh_job_env, make_dataset, stage_dict

EXE = os.path.join(os.path.dirname(sys.executable), "vila-hd")
EXPECTED = "expected a LLaVA .json / .jsonl file, a .parquet file or a saved dataset directory"


def vila_hd(*args, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in fresh_job_env().items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run([EXE, *map(str, args)], cwd=cwd, env=env, capture_output=True, encoding="utf-8",
                          timeout=300)


def cli_main(*argv) -> int:
    from vila_hd import cli

    return cli.main([str(a) for a in argv])


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    return make_dataset(str(tmp_path_factory.mktemp("data")), n=8)


@pytest.fixture()
def png(tmp_path) -> Path:
    from PIL import Image

    path = tmp_path / "img.png"
    Image.new("RGB", (8, 8)).save(path)
    return path


# --- data files of an unknown kind, or that do not parse (findings 1, 2, 17) ---------------------------------
def test_data_check_names_a_file_of_an_unknown_kind(capsys, png):
    code, err = run_main(capsys, "data", "check", png)
    assert code == 2
    one_error_line(err, str(png), "'.png'", EXPECTED)


def test_data_check_names_a_corrupt_parquet_file_without_the_schema_log(capsys, caplog, tmp_path):
    bad = tmp_path / "g.parquet"
    bad.write_bytes(b"PA")
    with caplog.at_level(logging.INFO):
        code, err = run_main(capsys, "data", "check", bad)
    assert code == 2
    one_error_line(err, str(bad), "cannot be read as parquet", "Parquet file size is 2 bytes", EXPECTED)
    assert not [r for r in caplog.records if "Failed to read schema" in r.getMessage()]
    assert logging.getLogger("datasets.packaged_modules.parquet.parquet").level == logging.NOTSET  # restored


def test_a_messages_file_that_does_not_parse_is_named(capsys, tmp_path):
    bad = tmp_path / "m.jsonl"
    bad.write_text("{not json\n")
    code, err = run_main(capsys, "data", "check", bad, "--format", "messages")
    assert code == 2
    one_error_line(err, str(bad), "cannot be read as json")


def test_finetune_lora_refuses_a_png_as_data_in_one_line(tmp_path, png, tiny_checkpoint):
    run = vila_hd("finetune-lora", "--model", tiny_checkpoint, "--data", png, "--output-dir", tmp_path / "out",
                  cwd=tmp_path)
    assert run.returncode == 1
    assert "[rank0]" not in run.stderr
    one_error_line(run.stderr, str(png), EXPECTED)


# --- the data is counted before the model is built (finding 27) ---------------------------------------------
def test_too_few_samples_for_a_global_batch_fail_before_the_model_is_built(capsys, monkeypatch, data, tmp_path,
                                                                         tiny_checkpoint):
    import vila_hd.train.stage

    def no_model(config):
        raise AssertionError("the model was built before the data was counted")

    monkeypatch.setattr(vila_hd.train.stage, "load_init", no_model)
    code, err = run_main(capsys, "finetune-lora", "--model", tiny_checkpoint, "--data", data, "--output-dir",
                         tmp_path / "out", "--global-batch-size", "16")
    assert code == 1
    one_error_line(err, "the data holds 8 samples, fewer than one global batch of 16", "--global-batch-size")
    assert not (tmp_path / "out").exists()


# --- training never writes into the checkpoint it starts from (new-user test 2, finding a) -------------------
def test_training_refuses_an_output_dir_in_its_init_checkpoint(capsys, monkeypatch, data, tmp_path):
    import yaml

    import vila_hd.train.stage

    def no_model(config):
        raise AssertionError("the model was built before output_dir was checked")

    monkeypatch.setattr(vila_hd.train.stage, "load_init", no_model)
    base = tmp_path / "base"
    base.mkdir()
    (tmp_path / "link").symlink_to(base)
    for out, where in ((base, "is"), (tmp_path / "link" / "run", "is inside")):
        code, err = run_main(capsys, "finetune-lora", "--model", tmp_path / "link", "--data", data,
                             "--output-dir", out)
        assert code == 1
        one_error_line(err, f"--output-dir {out} {where} the checkpoint", f"--model {tmp_path / 'link'}")
        recipe = tmp_path / "stage.yaml"
        cfg = stage_dict(data, str(out))
        cfg["init"] = {"ps3": str(tmp_path / "ps3"), "llm": str(tmp_path / "link")}
        recipe.write_text(yaml.safe_dump(cfg))
        code, err = run_main(capsys, "train", recipe)
        assert code == 1
        one_error_line(err, f"output_dir {out} {where} the checkpoint", f"init.llm {tmp_path / 'link'}")
    assert os.listdir(base) == []
    cfg["output_dir"] = str(tmp_path / "based")  # a sibling whose name starts with the checkpoint's is fine
    from vila_hd.train.config import stage_from_dict

    assert stage_from_dict(cfg).output_dir == str(tmp_path / "based")



# --- merge-lora's output folder (findings 8, 21) ---------------------------------------------------------------
@pytest.fixture()
def adapter(tmp_path, tiny_checkpoint) -> tuple[Path, Path]:
    """``(adapter, base)``: an untrained LoRA adapter on a copy of the tiny checkpoint."""
    import shutil

    from vila_hd.train.config import LoraConfig
    from vila_hd.train.lora import apply_lora, load_base_model, save_adapter

    base = tmp_path / "base"
    shutil.copytree(tiny_checkpoint, base)
    model, processor = load_base_model(str(base))
    peft_model = apply_lora(model, LoraConfig(r=2, alpha=4), ["llm", "projector"])
    save_adapter(peft_model, str(tmp_path / "adapter"), processor, str(base))
    return tmp_path / "adapter", base


def test_merge_lora_never_writes_into_its_base(capsys, adapter, tmp_path):
    adapter_dir, base = adapter
    weights = (base / "model.safetensors").read_bytes()
    (tmp_path / "link").symlink_to(base)
    for out in (base, tmp_path / "link"):
        for force in ([], ["--force"]):
            code, err = run_main(capsys, "merge-lora", "--adapter", adapter_dir, "--out", out, *force)
            assert code == 1
            one_error_line(err, f"--out {out} is the adapter's base checkpoint", "choose another --out")
    assert (base / "model.safetensors").read_bytes() == weights
    code, err = run_main(capsys, "merge-lora", "--adapter", adapter_dir, "--out", adapter_dir, "--force")
    assert code == 1
    one_error_line(err, "is the adapter directory itself")


def test_merge_lora_refuses_a_non_empty_out_unless_forced(capsys, adapter, tmp_path):
    adapter_dir, _ = adapter
    out = tmp_path / "merged"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    stale = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json"]
    for name in stale:  # a bigger earlier merge, sharded
        (out / name).write_text("old")
    code, err = run_main(capsys, "merge-lora", "--adapter", adapter_dir, "--out", out)
    assert code == 1
    one_error_line(err, f"{out} exists and is not empty (use --force to write into it)")
    assert sorted(os.listdir(out)) == sorted(["notes.txt", *stale])
    assert run_main(capsys, "merge-lora", "--adapter", adapter_dir, "--out", out, "--force")[0] == 0
    assert (out / "model.safetensors").is_file() and (out / "notes.txt").read_text() == "mine"
    assert not any((out / name).exists() for name in stale)


def test_merge_lora_refuses_a_file_as_out_before_loading(capsys, monkeypatch, adapter, png):
    import vila_hd.train.lora

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before --out was checked")

    monkeypatch.setattr(vila_hd.train.lora, "load_adapter_model", no_model)
    for force in ([], ["--force"]):
        code, err = run_main(capsys, "merge-lora", "--adapter", adapter[0], "--out", png, *force)
        assert code == 1
        one_error_line(err, f"--out {png} is a file; expected a folder to write the merged checkpoint into")


def test_merge_lora_says_a_missing_adapter_does_not_exist(capsys, tmp_path):
    code, err = run_main(capsys, "merge-lora", "--adapter", tmp_path / "nonexistent", "--out", tmp_path / "m")
    assert code == 1
    one_error_line(err, f"adapter {tmp_path / 'nonexistent'} does not exist")
    assert not (tmp_path / "m").exists()


# --- flags: types and help (findings 16, 31) ---------------------------------------------------------------------
@pytest.mark.parametrize("flag", ["--num-look-close", "--num-token-look-close"])
def test_data_check_look_close_flags_are_typed_like_chats(capsys, data, flag):
    code, err = run_main(capsys, "data", "check", data, "--no-images", flag, "abc")
    assert code == 2
    assert f"argument {flag}: expected a non-negative integer or 'all', got 'abc'" in err.splitlines()[-1]


def help_blocks(text: str) -> dict[str, str]:
    """Option -> its help text (whitespace joined) from an argparse --help output."""
    blocks: dict[str, str] = {}
    option = None
    for line in text.splitlines():
        stripped = line.strip()
        if line.startswith("  -") and not line.startswith("   "):
            option = stripped.split()[0].rstrip(",")
            blocks[option] = stripped
        elif option is not None and line.startswith("   "):
            blocks[option] += " " + stripped
        else:
            option = None
    return blocks


def help_text(capsys, *argv: str) -> str:
    from vila_hd import cli

    with pytest.raises(SystemExit) as exit_:
        cli.main([*argv, "--help"])
    assert exit_.value.code == 0
    return capsys.readouterr().out


def test_every_finetune_lora_flag_says_its_default(capsys):
    blocks = help_blocks(help_text(capsys, "finetune-lora"))
    for flag in ("--output-dir", "--epochs", "--max-length", "--micro-batch-size", "--global-batch-size",
                 "--no-resume", "--lr", "--rank", "--alpha", "--deepspeed", "--format", "--media", "--recipe"):
        assert "default" in blocks[flag], blocks[flag]
    assert "(default: outputs/lora)" in blocks["--output-dir"] and "recipe default: 16" in blocks["--global-batch-size"]


def test_data_check_help_describes_the_command_and_its_exit_codes(capsys):
    out = help_text(capsys, "data", "check")
    text = " ".join(out.split())
    assert "Exit code 0: no bad sample; 1: bad samples found; 2: the data cannot be checked at all" in text
    assert "(tests)" not in text and "random-weight preset" in help_blocks(out)["--preset"]


# --- a finished run says where its result is (finding 25) ----------------------------------------------------
QUICK = ["--set", "max_steps=1", "--set", "precision=fp32", "--set", "look_close.num_look_close=2",
         "--set", "look_close.num_token_look_close=null", "--set", "logging.progress_bar=false",
         "--set", "logging.tensorboard=false", "--set", "data.num_workers=0", "--set", "batch.micro_batch_size=2",
         "--set", "batch.global_batch_size=4", "--set", "data.max_length=512"]


def last_line(capsys) -> str:
    return capsys.readouterr().out.strip().splitlines()[-1]


def test_finetune_lora_ends_naming_the_adapter_folder(capsys, data, tmp_path, tiny_checkpoint):
    from vila_hd import cli

    out = tmp_path / "lora"
    media = os.path.join(os.path.dirname(data), "images")
    assert cli.main(["finetune-lora", "--model", str(tiny_checkpoint), "--data", data, "--media", media,
                     "--output-dir", str(out), "--rank", "2", *QUICK]) == 0
    line = last_line(capsys)
    assert line.startswith(f"wrote the LoRA adapter to {out / 'final'} ") and "vila-hd merge-lora" in line
    assert (out / "final" / "adapter_config.json").is_file()


def test_train_ends_naming_the_checkpoint_folder(capsys, data, tmp_path):
    import yaml

    from vila_hd import cli

    recipe = tmp_path / "stage.yaml"
    recipe.write_text(yaml.safe_dump(stage_dict(data, str(tmp_path / "run"))))
    assert cli.main(["train", str(recipe), *QUICK]) == 0
    assert last_line(capsys) == f"exported the VILA-HD checkpoint to {tmp_path / 'run' / 'final'}"
    assert (tmp_path / "run" / "final" / "config.json").is_file()


# --- the media hint fits the way the data came in (finding 22) ------------------------------------------------
def test_the_outside_media_hint_names_the_flag_or_the_yaml_key(capsys, tmp_path, png):
    record = {"id": "a", "image": str(png), "conversations": [{"from": "human", "value": "<image>\nhi"},
                                                              {"from": "gpt", "value": "yo"}]}
    data = tmp_path / "sub" / "d.jsonl"
    data.parent.mkdir()
    data.write_text(json.dumps(record) + "\n")
    code = cli_main("data", "check", data, "--no-images")
    assert code == 1
    assert "(pass --allow-outside-media to allow that)" in capsys.readouterr().out
    registry = tmp_path / "registry.yaml"
    registry.write_text(f"mine: {{path: {data}}}\n")
    code = cli_main("data", "check", registry, "--no-images")
    assert code == 1
    out = capsys.readouterr().out
    assert "(set allow_outside_media: true on the dataset entry to allow that)" in out and "--allow" not in out


# --- the parameter table counts each parameter once (finding 23) --------------------------------------------
def test_lora_parameter_table_counts_fully_trained_modules_once(data, tmp_path):
    from vila_hd.builder import build_tiny_model
    from vila_hd.train.config import stage_from_dict
    from vila_hd.train.lora import apply_lora
    from vila_hd.train.stage import set_trainable, trainable_summary

    parts = {"llm": 1e-3, "projector": 1e-3, "prompt_head": 1e-3, "selection": 1e-3}
    plain = stage_from_dict(stage_dict(data, str(tmp_path / "a"), trainable=parts))
    model, _ = build_tiny_model("tiny", seed=0)
    set_trainable(model, plain)
    full = trainable_summary(model)

    lora = stage_from_dict(stage_dict(data, str(tmp_path / "b"), trainable=parts, lora={"r": 2, "alpha": 4}))
    model, _ = build_tiny_model("tiny", seed=0)
    peft_model = apply_lora(model, lora.lora, list(parts))
    set_trainable(peft_model, lora)
    table = trainable_summary(peft_model)
    for part in ("projector", "prompt_head", "selection"):
        assert table[part] == full[part] and table[part][0] == table[part][1], part
    lora_params = sum(p.numel() for n, p in peft_model.named_parameters() if ".lora_" in n)
    assert table["llm"] == (lora_params, full["llm"][1] + lora_params)


# --- data check's exit codes and a registry's missing files (finding 15) -----------------------------------
def test_data_check_lists_every_missing_dataset_of_a_registry_and_exits_2(capsys, tmp_path, data):
    registry = tmp_path / "registry.yaml"
    registry.write_text(f"here: {{path: {data}}}\ngone_a: {{path: a/x.json}}\ngone_b: {{path: b/y.jsonl}}\n")
    code, err = run_main(capsys, "data", "check", registry, "--no-images")
    assert code == 2
    one_error_line(err, "2 datasets' files do not exist", f"'gone_a': {tmp_path / 'a' / 'x.json'}",
                   f"'gone_b': {tmp_path / 'b' / 'y.jsonl'}")
    assert "'here'" not in err
    assert run_main(capsys, "data", "check", registry, "--no-images", "--mixture", "here")[0] == 0
    code, err = run_main(capsys, "data", "check", registry, "--mixture", "here+nope")
    assert code == 2
    one_error_line(err, "--mixture names unknown dataset(s) ['nope']")


def test_the_readme_and_the_guide_give_data_checks_exit_codes():
    root = Path(testpaths.REPO_ROOT)
    guide = " ".join((root / "docs" / "training.md").read_text().split())
    assert "0, no bad sample; 1, bad samples found (the report says which); 2, the data cannot be checked" in guide
    readme = (root / "README.md").read_text()
    assert "0 ok, 1 bad samples, 2 cannot check" in readme and "example.yaml's datasets are not shipped" in readme
