"""Verified training checkpoints (issue #13 s.4, s.5b): a manifest (size and SHA-256 of every file) written last
and atomically; resume verifies it, falls back to the newest checkpoint that verifies with one ``resume:`` line
naming the damaged checkpoint, the file and why, and refuses (one ``vila-hd: error:`` line) only when none does;
``latest`` must name a checkpoint of the run's own checkpoint folder.

Damage cases: truncation to half, an empty file, deletion and a bit flip (an exponent bit of a float inside a
tensor's storage for the DeepSpeed and safetensors files, a digit of the JSON files) in each kind of file of a
real checkpoint: DeepSpeed model states, optimizer states, RNG state, trainer state, DeepSpeed's helper script,
the manifest, a LoRA adapter. One damaged file per kind is then resumed for real: the run continues from the
previous checkpoint and ends where the uninterrupted run does, bit for bit.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import zipfile

import pytest
import testpaths
import torch
import yaml
from safetensors.torch import load_file
from train_helpers import fresh_job_env, losses, make_dataset, one_thread, stage_dict  # noqa: F401 (fixture)

pytest.importorskip("deepspeed")

from vila_hd.train import checkpoint as ckpt  # noqa: E402

TESTS = testpaths.TESTS_DIR
ROOT = os.path.dirname(TESTS)
STEP2, STEP4 = ckpt.step_name(2), ckpt.step_name(4)
MODEL = "engine/mp_rank_00_model_states.pt"
OPTIM = "engine/zero_pp_rank_0_mp_rank_00_optim_states.pt"
RNG = "rng/rank_00000.pt"
ADAPTER = "adapter/adapter_model.safetensors"
KINDS = {"model states": MODEL, "optimizer states": OPTIM, "rng state": RNG, "trainer state": ckpt.STATE_FILE,
         "deepspeed script": "zero_to_fp32.py", "manifest": ckpt.MANIFEST, "lora adapter": ADAPTER}
DAMAGES = ("truncate", "empty", "delete", "flip")


@pytest.fixture(scope="module", autouse=True)
def _threads(one_thread):  # noqa: F811
    yield


def recipe(data: str, out: str, **overrides) -> dict:
    """4 tiny steps, a checkpoint every 2 (step_2 and step_4 kept); no gradient checkpointing (speed)."""
    cfg = stage_dict(data, out, max_steps=4, **{"checkpoint.every_steps": 2, "checkpoint.keep_last": 2}, **overrides)
    cfg["gradient_checkpointing"] = {"llm": False, "vision_tower": False}
    return cfg


def run(cfg: dict):
    from vila_hd.train.config import stage_from_dict
    from vila_hd.train.stage import run_stage

    return run_stage(stage_from_dict(cfg))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(str(tmp_path_factory.mktemp("data")), n=8)


@pytest.fixture(scope="module")
def full_run(data, tmp_path_factory):
    """The uninterrupted run: its checkpoints are copied and damaged, its losses and weights are the reference."""
    out = str(tmp_path_factory.mktemp("full") / "run")
    run(recipe(data, out))
    return out


@pytest.fixture(scope="module")
def lora_run(data, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("lora") / "run")
    run(recipe(data, out, lora={"r": 4, "alpha": 8, "dropout": 0.0}))
    return out


def copy_checkpoints(src: str, dst: str) -> str:
    """A run folder holding a copy of ``src``'s checkpoints only (no logs, no final export); returns its root."""
    shutil.copytree(ckpt.checkpoint_root(src), ckpt.checkpoint_root(dst))
    return ckpt.checkpoint_root(dst)


# --- damage -------------------------------------------------------------------------------------------------------
def _zip_storage_offset(path: str) -> tuple[int, int]:
    """(offset in the file, length) of the largest tensor storage of a torch.save zip (stored, uncompressed)."""
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        header = f.read(30)
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_len + extra_len, info.file_size


def _safetensors_offset(path: str) -> tuple[int, int]:
    """(offset in the file, length) of the largest F32 tensor of a safetensors file."""
    with open(path, "rb") as f:
        size = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(size))
    begin, end = max((v["data_offsets"] for k, v in header.items() if k != "__metadata__" and v["dtype"] == "F32"),
                     key=lambda o: o[1] - o[0])
    return 8 + size + begin, end - begin


def flip_bit(path: str) -> int:
    """Flip one bit: the top exponent bit of a float32 in the middle of the largest tensor (torch / safetensors
    files; a plain bit of a byte for the RNG's byte tensors), else the low bit of a digit (JSON stays valid) or
    of the middle byte. Returns the byte's offset."""
    if path.endswith(".pt"):
        start, length = _zip_storage_offset(path)
        at = start + (length // 2) // 4 * 4 + 3
        mask = 0x40
    elif path.endswith(".safetensors"):
        start, length = _safetensors_offset(path)
        at = start + (length // 2) // 4 * 4 + 3
        mask = 0x40
    else:
        raw = open(path, "rb").read()
        digits = [i for i, b in enumerate(raw) if chr(b).isdigit()] if path.endswith(".json") else []
        at = digits[len(digits) // 2] if digits else len(raw) // 2
        mask = 0x01
    with open(path, "r+b") as f:
        f.seek(at)
        byte = f.read(1)[0]
        f.seek(at)
        f.write(bytes([byte ^ mask]))
    return at


def damage(path: str, how: str) -> None:
    if how == "delete":
        os.remove(path)
    elif how == "flip":
        flip_bit(path)
    else:
        with open(path, "r+b") as f:
            f.truncate(0 if how == "empty" else os.path.getsize(path) // 2)


def expected_reason(rel: str, how: str) -> str:
    if rel == ckpt.MANIFEST:
        return {"truncate": "manifest.json: unreadable", "empty": "manifest.json: unreadable",
                "delete": "manifest.json: missing", "flip": "manifest.json: altered"}[how]
    return {"truncate": f"{rel}: ", "empty": f"{rel}: 0 bytes, the manifest says", "delete": f"{rel}: missing",
            "flip": f"{rel}: sha256 mismatch"}[how]


def resume_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("resume:")]


# --- 1. every kind of file, every damage: the previous checkpoint is taken, in one line -------------------------------
@pytest.mark.parametrize("how", DAMAGES)
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(kind, how, full_run, lora_run, tmp_path, capsys,
                                                                  reliability):
    rel = KINDS[kind]
    out = str(tmp_path / "run")
    root = copy_checkpoints(lora_run if kind == "lora adapter" else full_run, out)
    assert ckpt.verify(os.path.join(root, STEP4)) is None  # the copy verifies before the damage
    damage(os.path.join(root, STEP4, rel), how)
    capsys.readouterr()
    assert ckpt.choose_resume(out) == os.path.join(root, STEP2)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"resume: {STEP4} is damaged ({expected_reason(rel, how)}"), lines[0]
    assert lines[0].endswith(f"; resuming from {STEP2}"), lines[0]
    if how == "truncate" and rel != ckpt.MANIFEST:
        assert "bytes, the manifest says" in lines[0]
    reliability.add("checkpoints", "damage_cases", 1)
    reliability.add("checkpoints", "damage_recovered", 1)
    reliability.record("checkpoints", "file_kinds", len(KINDS))


def _tensors(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors(v)]
    return []


def test_an_exponent_bit_flip_in_the_optimizer_states_loads_silently_without_the_manifest(full_run, tmp_path):
    """What the manifest catches: the flipped file still unpickles, one float32 moved by 2**128 (or to inf)."""
    path = str(tmp_path / "optim.pt")
    shutil.copy(os.path.join(ckpt.checkpoint_root(full_run), STEP4, OPTIM), path)
    before = _tensors(ckpt.load_weights_only(path))
    flip_bit(path)
    after = _tensors(ckpt.load_weights_only(path))
    changed = [(b[b != a], a[b != a]) for b, a in zip(before, after) if b.is_floating_point() and not torch.equal(a, b)]
    assert len(changed) == 1 and changed[0][0].numel() == 1, changed
    old, new = float(changed[0][0]), float(changed[0][1])
    assert not torch.isfinite(torch.tensor(new)) or old == 0 or abs(new / old) > 2**100 or abs(new / old) < 2**-100


# The real resume after a damage (one per damage kind): steps 3-4 repeat the uninterrupted run exactly.
EXACT = [("optimizer states", "flip"), ("model states", "truncate"), ("rng state", "delete"),
         ("trainer state", "empty")]


@pytest.mark.parametrize(("kind", "how"), EXACT)
def test_resume_after_damage_continues_exactly_from_the_previous_checkpoint(kind, how, data, full_run, tmp_path,
                                                                            capsys, reliability):
    out = str(tmp_path / "run")
    root = copy_checkpoints(full_run, out)
    damage(os.path.join(root, STEP4, KINDS[kind]), how)
    capsys.readouterr()
    run(recipe(data, out))
    printed = capsys.readouterr().out
    assert len(resume_lines(printed)) == 1, printed
    assert resume_lines(printed)[0].startswith(f"resume: {STEP4} is damaged ({expected_reason(KINDS[kind], how)}")
    assert f"resumed from {os.path.join(root, STEP2)} (step 2 of 4)" in printed
    ref, got = losses(full_run), losses(out)
    assert sorted(got) == [3, 4]  # resumed at step 2, not 4 and not 0
    for step in (3, 4):
        assert got[step] == ref[step], (step, got[step], ref[step])
    weights, reference = load_file(os.path.join(out, "final", "model.safetensors")), load_file(
        os.path.join(full_run, "final", "model.safetensors"))
    assert sorted(weights) == sorted(reference) and all(torch.equal(weights[k], reference[k]) for k in reference)
    # The damaged step_4 was written again; pruning kept the previous checkpoint and the new one, both verified.
    assert sorted(os.listdir(root)) == ["latest", STEP2, STEP4]
    assert ckpt.verify(os.path.join(root, STEP4)) is None and ckpt.verify(os.path.join(root, STEP2)) is None
    reliability.add("checkpoints", "exact_resumes", 1)


# --- 2. nothing verifies: refused, in one line -----------------------------------------------------------------------
def test_all_checkpoints_damaged_is_refused_naming_each(full_run, tmp_path, reliability):
    out = str(tmp_path / "run")
    root = copy_checkpoints(full_run, out)
    flip_bit(os.path.join(root, STEP2, OPTIM))
    os.remove(os.path.join(root, STEP4, RNG))
    with pytest.raises(ckpt.CheckpointDamagedError) as err:
        ckpt.choose_resume(out)
    message = str(err.value)
    assert "\n" not in message
    assert f"{STEP4} ({RNG}: missing)" in message and f"{STEP2} ({OPTIM}: sha256 mismatch" in message
    assert "--no-resume" in message
    reliability.add("checkpoints", "refusals", 1)


def console_script() -> str:
    beside = os.path.join(os.path.dirname(sys.executable), "vila-hd")
    found = beside if os.access(beside, os.X_OK) else shutil.which("vila-hd")
    if found is None:
        pytest.fail(f"no vila-hd console script next to {sys.executable} or on PATH")
    return found


def test_vila_hd_train_refuses_when_no_checkpoint_verifies(data, full_run, tmp_path, reliability):
    out = str(tmp_path / "run")
    root = copy_checkpoints(full_run, out)
    damage(os.path.join(root, STEP2, MODEL), "truncate")
    damage(os.path.join(root, STEP4, ckpt.MANIFEST), "flip")
    config = tmp_path / "stage.yaml"
    config.write_text(yaml.safe_dump(recipe(data, out)))
    env = fresh_job_env()
    env.pop("PYTHONPATH", None)
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([console_script(), "train", str(config)], cwd=str(tmp_path), env=env, capture_output=True,
                          encoding="utf-8", timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("vila-hd: error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert errors[0].startswith(f"vila-hd: error: resume: no checkpoint in {root} verifies"), errors[0]
    assert f"{STEP4} (manifest.json: altered" in errors[0] and f"{STEP2} ({MODEL}: " in errors[0], errors[0]
    assert not os.path.exists(os.path.join(out, "final"))
    reliability.add("checkpoints", "refusals", 1)


# --- 3. `latest` stays in the run's checkpoint folder ----------------------------------------------------------------
def _other_run(tmp_path, full_run) -> str:
    """A complete, verifying checkpoint of another run: ``<tmp>/other_run/checkpoints/step_00000021``."""
    other = str(tmp_path / "other_run" / "checkpoints" / ckpt.step_name(21))
    shutil.copytree(os.path.join(ckpt.checkpoint_root(full_run), STEP4), other)
    assert ckpt.verify(other) is None
    return other


@pytest.mark.parametrize("pointer", ["relative escape", "absolute path", "symlink out", "symlink in"])
def test_latest_naming_anything_but_an_own_checkpoint_is_ignored(pointer, full_run, tmp_path, capsys, reliability):
    other = _other_run(tmp_path, full_run)
    out = str(tmp_path / "run")
    root = copy_checkpoints(full_run, out)
    name = {"relative escape": f"../../other_run/checkpoints/{ckpt.step_name(21)}", "absolute path": other,
            "symlink out": ckpt.step_name(21), "symlink in": ckpt.step_name(9)}[pointer]
    if pointer == "symlink out":
        os.symlink(other, os.path.join(root, name))
    if pointer == "symlink in":
        os.symlink(os.path.join(root, STEP2), os.path.join(root, name))
    with open(os.path.join(root, ckpt.LATEST), "w") as f:
        f.write(name)
    capsys.readouterr()
    assert ckpt.choose_resume(out) == os.path.join(root, STEP4)  # the newest own checkpoint
    assert ckpt.find_latest(out) == os.path.join(root, STEP4)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1, lines
    why = {"relative escape": "not a plain step_N name", "absolute path": "not a plain step_N name",
           "symlink out": f"a symbolic link to {os.path.realpath(other)}, outside {root}",
           "symlink in": f"a symbolic link to {os.path.realpath(os.path.join(root, STEP2))}, inside {root}"}[pointer]
    assert lines[0] == (f"resume: {os.path.join(root, ckpt.LATEST)} names {name!r}, which is ignored ({why}); "
                        f"resuming from {STEP4}"), lines[0]
    assert [os.path.basename(p) for _, p in ckpt.complete_checkpoints(root)] == [STEP2, STEP4]  # no link counted
    reliability.add("checkpoints", "latest_escapes_ignored", 1)


def test_latest_naming_another_run_with_no_own_checkpoint_starts_from_step_0(full_run, tmp_path, capsys,
                                                                             reliability):
    _other_run(tmp_path, full_run)
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / ckpt.LATEST).write_text(f"../../other_run/checkpoints/{ckpt.step_name(21)}")
    capsys.readouterr()
    assert ckpt.choose_resume(str(out)) is None
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and "which is ignored (not a plain step_N name); starting from step 0" in lines[0], lines
    reliability.add("checkpoints", "latest_escapes_ignored", 1)


# --- 4. older checkpoints without a manifest; a deleted manifest ---------------------------------------------------
def _make_legacy(checkpoint_dir: str) -> None:
    """What an older version wrote: no manifest, no format key in the trainer state."""
    os.remove(os.path.join(checkpoint_dir, ckpt.MANIFEST))
    state = ckpt.read_state(checkpoint_dir)
    del state[ckpt.FORMAT_KEY]
    with open(os.path.join(checkpoint_dir, ckpt.STATE_FILE), "w") as f:
        json.dump(state, f)


def test_legacy_checkpoints_without_a_manifest_still_resume_with_a_note(full_run, tmp_path, capsys, reliability):
    out = str(tmp_path / "run")
    root = copy_checkpoints(full_run, out)
    for step in (STEP2, STEP4):
        _make_legacy(os.path.join(root, step))
    capsys.readouterr()
    assert ckpt.choose_resume(out) == os.path.join(root, STEP4)
    assert capsys.readouterr().out.splitlines() == [
        f"resume: {STEP4} has no manifest.json (written by an older version) and cannot be verified; resuming "
        f"from {STEP4}"]
    reliability.add("checkpoints", "legacy_cases", 1)


def test_a_legacy_checkpoint_that_fails_to_load_is_one_clear_error(data, full_run, tmp_path, reliability):
    """Nothing to verify it against: DeepSpeed's read of the truncated file fails, named in one line (no bare
    EOFError / RuntimeError)."""
    out = str(tmp_path / "run")
    root = copy_checkpoints(full_run, out)
    _make_legacy(os.path.join(root, STEP4))
    damage(os.path.join(root, STEP4, OPTIM), "truncate")
    with pytest.raises(ckpt.CheckpointLoadError) as err:
        run(recipe(data, out))
    message = str(err.value)
    assert "\n" not in message and f"checkpoint {os.path.join(root, STEP4)} could not be loaded (" in message
    assert "Move it out of the checkpoint folder" in message
    reliability.add("checkpoints", "legacy_cases", 1)


def test_a_deleted_manifest_of_the_only_checkpoint_is_damage_not_an_older_version(full_run, tmp_path, reliability):
    """keep_last=1: no other checkpoint shows that the run writes manifests; the trainer state's format key does."""
    out = str(tmp_path / "run")
    root = copy_checkpoints(full_run, out)
    shutil.rmtree(os.path.join(root, STEP2))
    os.remove(os.path.join(root, STEP4, ckpt.MANIFEST))
    assert not ckpt.is_legacy(os.path.join(root, STEP4))
    with pytest.raises(ckpt.CheckpointDamagedError, match=rf"{STEP4} \(manifest.json: missing\)"):
        ckpt.choose_resume(out)
    reliability.add("checkpoints", "refusals", 1)


def test_a_file_the_manifest_does_not_list_is_damage(full_run, tmp_path):
    out = str(tmp_path / "run")
    root = copy_checkpoints(full_run, out)
    shutil.copy(os.path.join(root, STEP4, OPTIM), os.path.join(root, STEP4, "engine",
                                                                "zero_pp_rank_1_mp_rank_00_optim_states.pt"))
    assert ckpt.verify(os.path.join(root, STEP4)) == "engine/zero_pp_rank_1_mp_rank_00_optim_states.pt: not in " \
                                                     "the manifest"


def test_a_manifest_listing_paths_outside_the_checkpoint_is_refused(tmp_path):
    folder = tmp_path / "step_00000002"
    folder.mkdir()
    (folder / ckpt.STATE_FILE).write_text("{}")
    manifest = ckpt.build_manifest(str(folder))
    manifest["files"]["../../outside"] = {"size": 0, "sha256": "0" * 64}
    manifest["files_sha256"] = ckpt._listing_digest(manifest["files"])
    (folder / ckpt.MANIFEST).write_text(json.dumps(manifest))
    assert ckpt.verify(str(folder)) == "manifest.json: lists '../../outside', not a file of the checkpoint"


@pytest.mark.parametrize("key", ["sha256", "size"])
def test_a_flipped_bit_in_an_entry_key_reads_as_an_altered_manifest(tmp_path, key):
    """A flip can land in a key (``sha256`` -> ``sha356``, the low bit of a digit): the manifest is then altered,
    told by its checksum, whichever byte the flip hit (not a malformed entry)."""
    folder = tmp_path / "step_00000002"
    folder.mkdir()
    (folder / ckpt.STATE_FILE).write_text("{}")
    text = json.dumps(ckpt.build_manifest(str(folder)))
    (folder / ckpt.MANIFEST).write_text(text.replace(f'"{key}"', f'"{key}x"' if key == "size" else '"sha356"', 1))
    assert ckpt.verify(str(folder)).startswith("manifest.json: altered")


# --- 5. the manifest is the last file, written atomically; every rank's files are in it -------------------------------
class FakeEngine:
    """Writes DeepSpeed-like files (the order of a checkpoint's files does not depend on the model)."""

    def save_checkpoint(self, path, tag, client_state, save_latest):
        os.makedirs(os.path.join(path, tag), exist_ok=True)
        torch.save({"module": torch.ones(8)}, os.path.join(path, tag, "mp_rank_00_model_states.pt"))
        torch.save({"exp_avg": torch.zeros(8)}, os.path.join(path, tag, "zero_pp_rank_0_mp_rank_00_optim_states.pt"))


def _extra(directory: str) -> None:
    os.makedirs(os.path.join(directory, "adapter"))
    with open(os.path.join(directory, "adapter", "adapter_model.safetensors"), "wb") as f:
        f.write(b"weights")


def test_the_manifest_is_written_last_and_atomically_and_lists_every_file(tmp_path, monkeypatch):
    out = str(tmp_path)
    ckpt.save(FakeEngine(), out, 2, {"n": 2}, extra=_extra)
    events, seen = [], {}
    write_atomic, publish, replace, fsync = ckpt._write_atomic, ckpt._publish, os.replace, os.fsync

    def recording_publish(tmp, final):
        seen["files"] = {rel: os.stat(os.path.join(tmp, rel)).st_mtime_ns for rel in ckpt._files(tmp)}
        seen["manifest_mtime"] = os.stat(os.path.join(tmp, ckpt.MANIFEST)).st_mtime_ns
        seen["listed"] = sorted(json.load(open(os.path.join(tmp, ckpt.MANIFEST)))["files"])
        seen["names"] = sorted(os.listdir(tmp))
        events.append(("publish", os.path.basename(final)))
        publish(tmp, final)

    def recording_fsync(fd):
        events.append(("fsync", os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))))
        return fsync(fd)

    monkeypatch.setattr(ckpt, "_write_atomic", lambda p, t: (events.append(("write", os.path.basename(p))),
                                                             write_atomic(p, t)))
    monkeypatch.setattr(ckpt, "_publish", recording_publish)
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("rename", os.path.basename(a),
                                                                    os.path.basename(b))), replace(a, b)))
    if os.path.isdir("/proc/self/fd"):
        monkeypatch.setattr(os, "fsync", recording_fsync)
    ckpt.save(FakeEngine(), out, 4, {"n": 4}, extra=lambda d: (events.append(("extra",)), _extra(d)))
    monkeypatch.undo()
    names = [e for e in events if e[0] != "fsync"]
    manifest_write = names.index(("write", ckpt.MANIFEST))
    assert names.index(("extra",)) < names.index(("write", ckpt.STATE_FILE)) < manifest_write
    tmp_name = f"{ckpt.MANIFEST}.tmp-{os.getpid()}"
    # The manifest: a temporary file, fsynced, renamed; then the directory is published, then `latest` moves.
    assert names[manifest_write + 1:manifest_write + 3] == [("rename", tmp_name, ckpt.MANIFEST), ("publish", STEP4)]
    if os.path.isdir("/proc/self/fd"):
        at = events.index(("rename", tmp_name, ckpt.MANIFEST))
        assert ("fsync", tmp_name) in events[:at]
    assert names[-2:] == [("write", ckpt.LATEST), ("rename", f"{ckpt.LATEST}.tmp-{os.getpid()}", ckpt.LATEST)]
    assert seen["names"] == sorted(["adapter", "engine", "rng", ckpt.STATE_FILE, ckpt.MANIFEST])
    assert seen["listed"] == sorted(seen["files"]) and "adapter/adapter_model.safetensors" in seen["listed"]
    assert all(seen["manifest_mtime"] >= t for t in seen["files"].values())
    assert ckpt.verify(os.path.join(ckpt.checkpoint_root(out), STEP4)) is None


def test_a_failure_while_the_manifest_is_written_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    out = str(tmp_path)
    ckpt.save(FakeEngine(), out, 2, {"n": 2})
    replace = os.replace

    def failing(a, b):
        if os.path.basename(b) == ckpt.MANIFEST:
            raise OSError(5, "Input/output error")
        return replace(a, b)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(OSError, match="Input/output error"):
        ckpt.save(FakeEngine(), out, 4, {"n": 4})
    monkeypatch.undo()
    root = ckpt.checkpoint_root(out)
    assert sorted(os.listdir(root)) == [f".tmp-{STEP4}", "latest", STEP2]
    assert not [n for n in os.listdir(os.path.join(root, f".tmp-{STEP4}")) if n.startswith(ckpt.MANIFEST)]
    assert ckpt.choose_resume(out) == os.path.join(root, STEP2)


MULTI_RANK = r"""
import json, os, sys
out, root_dir = sys.argv[1], sys.argv[2]
sys.path.insert(0, root_dir)
import torch, torch.distributed as dist
dist.init_process_group("gloo")
from vila_hd.train import checkpoint as ckpt
rank = dist.get_rank()

class Engine:
    def save_checkpoint(self, path, tag, client_state, save_latest):
        os.makedirs(os.path.join(path, tag), exist_ok=True)
        if rank == 0:
            torch.save({"module": torch.ones(8)}, os.path.join(path, tag, "mp_rank_00_model_states.pt"))
        torch.save({"exp_avg": torch.full((8,), float(rank))},
                   os.path.join(path, tag, f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"))

def extra(d):
    os.makedirs(os.path.join(d, "adapter"), exist_ok=True)
    with open(os.path.join(d, "adapter", f"part_{rank}.bin"), "wb") as f:
        f.write(b"x" * 16)

result = {}
for step in (2, 4):
    ckpt.save(Engine(), out, step, {"n": step}, keep_last=2, extra=extra)
root = ckpt.checkpoint_root(out)
with open(os.path.join(root, "step_00000004", "manifest.json")) as f:
    result["listed"] = sorted(json.load(f)["files"])
dist.barrier()
if rank == 0:  # rank 1's optimizer file of the newest checkpoint is damaged
    with open(os.path.join(root, "step_00000004", "engine", "zero_pp_rank_1_mp_rank_00_optim_states.pt"), "r+b") as f:
        f.truncate(10)
dist.barrier()
result["chosen"] = ckpt.choose_resume(out)
dist.barrier()
if rank == 0:
    os.remove(os.path.join(root, "step_00000002", "rng", "rank_00001.pt"))
dist.barrier()
try:
    ckpt.choose_resume(out)
    result["error"] = None
except ckpt.CheckpointDamagedError as err:
    result["error"] = str(err)
with open(os.path.join(out, f"result_{rank}.json"), "w") as f:
    json.dump(result, f)
dist.destroy_process_group()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_list_every_rank_file_and_agree_on_the_fallback(tmp_path):
    """gloo, 2 processes: the manifest lists both ranks' RNG, optimizer and extra files; rank 0 decides, both ranks
    get the same checkpoint (only rank 0 prints), and both raise when none verifies (no rank left waiting)."""
    out = str(tmp_path / "run")
    env = fresh_job_env()
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE="2", OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-c", MULTI_RANK, out, ROOT], env=dict(env, RANK=str(r)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, encoding="utf-8") for r in range(2)]
    outputs = [p.communicate(timeout=180)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    results = [json.load(open(os.path.join(out, f"result_{r}.json"))) for r in range(2)]
    assert results[0]["listed"] == ["adapter/part_0.bin", "adapter/part_1.bin", "engine/mp_rank_00_model_states.pt",
                                    "engine/zero_pp_rank_0_mp_rank_00_optim_states.pt",
                                    "engine/zero_pp_rank_1_mp_rank_00_optim_states.pt", "rng/rank_00000.pt",
                                    "rng/rank_00001.pt", ckpt.STATE_FILE]
    root = ckpt.checkpoint_root(out)
    assert results[0]["chosen"] == results[1]["chosen"] == os.path.join(root, STEP2)
    assert len(resume_lines(outputs[0])) == 1 and not resume_lines(outputs[1]), outputs
    assert f"{STEP4} is damaged (engine/zero_pp_rank_1_mp_rank_00_optim_states.pt: 10 bytes" in outputs[0]
    assert results[0]["error"] == results[1]["error"] and f"{STEP2} (rng/rank_00001.pt: missing)" in results[0]["error"]


# --- pruning ---------------------------------------------------------------------------------------------------------
def test_pruning_never_deletes_the_newest_checkpoint_that_verifies(tmp_path):
    out = str(tmp_path)
    for step in (2, 4, 6):
        ckpt.save(FakeEngine(), out, step, {"n": step}, keep_last=10)
    root = ckpt.checkpoint_root(out)
    for step in (4, 6):
        flip_bit(os.path.join(root, ckpt.step_name(step), "engine", "mp_rank_00_model_states.pt"))
    ckpt.prune(root, keep_last=2)
    assert sorted(os.listdir(root)) == ["latest", STEP2, STEP4, ckpt.step_name(6)]  # step 2: the newest verified
    assert ckpt.choose_resume(out) == os.path.join(root, STEP2)
    ckpt.save(FakeEngine(), out, 8, {"n": 8}, keep_last=2)  # a new verified checkpoint: the damaged ones can go
    assert sorted(os.listdir(root)) == ["latest", ckpt.step_name(6), ckpt.step_name(8)]
