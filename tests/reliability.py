"""Regenerate docs/reliability.md: run the fuzzers and the fault-injection tests at full counts, then write the
table of what was tried and what came out.

    python -m tests.reliability              # full counts (about 4-5 minutes on 2 CPU cores)
    python -m tests.reliability --quick      # the CI counts (a couple of minutes), to check the pipeline

It runs ``pytest --reliability-full`` on the reliability test files; each test records its figures (cases tried,
outcomes, kills survived...) through the ``reliability`` fixture of tests/conftest.py into a JSON report, which
this script turns into the document. A failing test is reported in the document (and the exit code is 1).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = {
    "images": "tests/processing/test_fuzz_images.py",
    "data": "tests/train/test_fuzz_data.py",
    "faults": "tests/train/test_fault_injection.py",
    "checkpoints": "tests/train/test_checkpoint_manifest.py",
    "loading": "tests/loading/test_loading_safety.py",
    "custom_code": "tests/loading/test_custom_code.py",
    "strict_loading": "tests/loading/test_strict_loading.py",
    "limits": "tests/serve/test_serving_limits.py",
}
OUT = os.path.join(ROOT, "docs", "reliability.md")


def run_tests(full: bool, report: str, junit: str) -> int:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *FILES.values(),
           f"--reliability-report={report}", f"--junitxml={junit}", "-W", "ignore"]
    if full:
        cmd.append("--reliability-full")
    print("running:", " ".join(cmd), flush=True)
    return subprocess.run(cmd, cwd=ROOT).returncode


def test_outcomes(junit: str) -> dict[str, dict]:
    """Per test file: passed / failed / skipped counts, seconds, names of the failures."""
    out = {key: {"passed": 0, "failed": 0, "skipped": 0, "seconds": 0.0, "failures": []} for key in FILES}
    by_module = {os.path.splitext(os.path.basename(path))[0]: key for key, path in FILES.items()}
    for case in ET.parse(junit).iter("testcase"):
        key = by_module.get(case.get("classname", "").split(".")[-1])
        if key is None:
            continue
        entry = out[key]
        entry["seconds"] += float(case.get("time", 0))
        if case.find("failure") is not None or case.find("error") is not None:
            entry["failed"] += 1
            entry["failures"].append(case.get("name"))
        elif case.find("skipped") is not None:
            entry["skipped"] += 1
        else:
            entry["passed"] += 1
    return out


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _status(outcome: dict) -> str:
    if outcome["failed"]:
        return f"**{outcome['failed']} FAILED** ({', '.join(outcome['failures'])})"
    skipped = f", {outcome['skipped']} skipped" if outcome["skipped"] else ""
    return f"{outcome['passed']} tests pass{skipped} ({outcome['seconds']:.0f} s)"


def _checkpoints_row(c: dict, outcome: dict) -> str:
    g = lambda k: c.get(k, 0)  # noqa: E731
    return (f"| training checkpoints | **{g('damage_cases')}** damaged files in the newest checkpoint "
            f"({g('file_kinds')} kinds of file x truncation, emptying, deletion, a bit flip), "
            f"{g('latest_escapes_ignored')} `latest` pointers out of the run's folder, {g('legacy_cases')} older-"
            f"version checkpoints | every damage found by the manifest; {g('damage_recovered')} resumed from the "
            f"previous checkpoint with one `resume:` line naming checkpoint, file and why, {g('exact_resumes')} of "
            "them trained on to the uninterrupted run's weights bit for bit; no checkpoint verifying is one "
            f"`vila-hd: error:` line ({g('refusals')} cases); {_status(outcome)} |")


def _checkpoints_section(c: dict) -> list[str]:
    g = lambda k: c.get(k, 0)  # noqa: E731
    return [
        "## Training checkpoints (`tests/train/test_checkpoint_manifest.py`)",
        "",
        "Every checkpoint ends with `manifest.json` (size and SHA-256 of every other file, and a SHA-256 of that "
        "list), written after every rank's files and the `extra` writer's (e.g. the LoRA adapter) as a temporary "
        "file, fsynced and renamed, before the directory is published. Resume checks the newest checkpoint (the one"
        " `latest` names) against it -- manifest checksum, every file present with its size, no unlisted file, "
        "then every SHA-256 -- and goes back one checkpoint at a time until one verifies, printing one line, e.g. "
        "`resume: step_00000004 is damaged (engine/zero_pp_rank_0_mp_rank_00_optim_states.pt: sha256 mismatch "
        "(altered)); resuming from step_00000002`. When none verifies, `vila-hd train` stops with one line "
        "naming each checkpoint and why (`CheckpointDamagedError`). `latest` naming `../`, an absolute path or a "
        "symbolic link (out of the folder or in it) is ignored with a message. A checkpoint of an older version "
        "(no manifest, no `checkpoint_format` in its trainer state) resumes unverified, with a note; a load that "
        "fails anyway is one line (`CheckpointLoadError`).",
        "",
        "| figure | value |",
        "|---|---|",
        f"| damage cases (file kinds: DeepSpeed model states, optimizer states, RNG state, trainer state, "
        f"DeepSpeed's script, manifest, LoRA adapter; x truncation, empty, deletion, bit flip) | "
        f"{g('damage_cases')}, {g('damage_recovered')} resumed from the previous checkpoint |",
        f"| of which trained on after the fallback (one per kind of damage) | {g('exact_resumes')}, losses and final "
        "weights equal to the uninterrupted run's bit for bit |",
        f"| `latest` outside the run (`../../other_run/...`, absolute, symlink out, symlink in, no own checkpoint) "
        f"| {g('latest_escapes_ignored')} ignored with a message |",
        f"| nothing verifies (in process, `vila-hd train`, a lost manifest of the only checkpoint) | "
        f"{g('refusals')} refused in one line |",
        f"| older-version checkpoints (resumed with a note; a truncated one named in one line) | "
        f"{g('legacy_cases')} |",
        "",
    ]


def _merged(*outcomes: dict) -> dict:
    """One outcome for several test files (counts and seconds added, failures listed)."""
    return {k: sum(o[k] for o in outcomes) if k != "failures" else [f for o in outcomes for f in o[k]]
            for k in ("passed", "failed", "skipped", "seconds", "failures")}


def _contents_row(c: dict, outcome: dict) -> str:
    g = lambda k: c.get(k, 0)  # noqa: E731
    return (f"| checkpoint contents | **{g('planted_code_cases')}** checkpoints with code planted behind an "
            f"`auto_map`, through {g('loader_refusals')} loader calls and {g('cli_runs')} `vila-hd chat` / `data "
            f"check` runs answering `y`; {g('damaged_weight_cases')} weight files with tensors missing, none, extra "
            f"or mis-shaped; {g('backbone_refusals')} unknown PS3 backbones | no planted code ran; each refused "
            f"with one error naming the key (`auto_map`, the tensors, `model_name`) and the file; "
            f"{g('allowance_cases')} explicit allowances load with only the allowed tensors fresh; {_status(outcome)} |")


def _contents_section(c: dict) -> list[str]:
    return [
        "## Checkpoint contents (`tests/loading/test_custom_code.py`, `tests/loading/test_strict_loading.py`)",
        "",
        "- No code from a checkpoint directory runs. Before any transformers `Auto*` call, every loader (VILA-HD "
        "and PS3 `from_pretrained`, the processors, the PS3 tokenizer, the VILA layout loader, the stage-1 builder,"
        " `vila_hd.loading.load_pretrained` / `vila_hd.load`, a LoRA adapter directory) refuses an `auto_map` at any depth of "
        "`config.json`, `tokenizer_config.json`, `processor_config.json` or `preprocessor_config.json`, in the "
        "directory and in its `llm/`, `vision_tower/`, `mm_projector/` folders (`CustomCodeError`, naming the key, "
        "the file and the `.py` it points at). Every transformers / peft `from_pretrained` / `from_config` call "
        "also passes `trust_remote_code=False` (an AST scan in `tests/loading/test_loading_safety.py` fails any that does "
        "not, outside an explicit list of our own loaders). The tests plant an `evil.py` that writes a marker when "
        "imported, answer `y` on stdin, and check the marker never appears (and that transformers told to trust "
        "remote code does import it).",
        "- Nothing loads half a model. A checkpoint with tensors missing (one, or an empty `model.safetensors`), "
        "unexpected or mis-shaped is a `CheckpointError` naming them (the first five and a count), for our "
        "single-directory format, PS3 checkpoints and every part of the VILA layout (named as keys of the combined"
        " model, `language_model.*`, `vision_tower.*`, `mm_projector.*`); `vila-hd` prints it as one line, without"
        " transformers' load-report table. `from_pretrained(..., allow_missing_keys=[pattern])` / "
        "`allow_unexpected_keys=[pattern]` (regular expressions searched in the key, e.g. "
        "`^mm_projector\\.top_down_prompt_head\\.` for a new prompt head) and transformers' "
        "`ignore_mismatched_sizes=True` allow them explicitly; every other tensor is then the checkpoint's, bit "
        "for bit. A released PS3 checkpoint holds both towers: each tower ignores the other's tensors by design.",
        "- An unknown PS3 backbone (`model_name` not one of the released timm names and not all of `hidden_size`, "
        "`num_hidden_layers`, `num_attention_heads`, `intermediate_size`, `patch_size` given) is a `ConfigError` "
        "naming the name, the known names and the fields to set (and the config file where it was read), "
        "instead of SO400M sizes and a shape mismatch on every tensor.",
        "- Not covered yet: the stage-1 builder (`init: {ps3, llm}`) loads the LLM without this check (a strict "
        "xfail test marks it).",
        "",
    ]


def render(figures: dict, outcomes: dict, full: bool) -> str:
    from vila_hd.engine import ServingLimits

    images, data, faults = figures.get("images", {}), figures.get("data", {}), figures.get("faults", {})
    loading, reasons = figures.get("loading", {}), figures.get("data_reasons", {})
    checkpoints, contents = figures.get("checkpoints", {}), figures.get("contents", {})
    g = lambda d, k: d.get(k, 0)  # noqa: E731
    image_total = sum(g(images, k) for k in ("hypothesis_cases", "child_cases", "array_cases", "truncated_cases",
                                              "bomb_headers", "odd_paths"))
    data_total = sum(g(data, k) for k in ("llava_records", "messages_records", "parquet_records", "path_cases"))
    limits = ServingLimits()
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# Reliability: bad input, faults and security",
        "",
        f"Generated by `python -m tests.reliability`{'' if full else ' --quick (CI counts)'} on {when}, commit "
        f"`{_git_commit()}`, {platform.machine()} with {os.cpu_count()} CPU core(s), Python "
        f"{platform.python_version()}. Do not edit by hand: run the command again.",
        "",
        "What the stack promises: a bad file costs one sample (or one request), a crash costs the steps since the "
        "last checkpoint, and loading a checkpoint cannot run code.",
        "",
        "## Summary",
        "",
        "| area | what was tried | result |",
        "|---|---|---|",
        f"| image input | **{image_total:,}** images: {g(images, 'hypothesis_cases'):,} mutated files (hypothesis, in "
        f"process) + {g(images, 'child_cases'):,} (seeded, in a child process under an address-space limit) + "
        f"{g(images, 'array_cases'):,} arrays / tensors + {g(images, 'truncated_cases')} truncations + "
        f"{g(images, 'bomb_headers')} decompression-bomb headers + {g(images, 'odd_paths')} odd paths | "
        f"every case a tensor or an `ImageLoadError` naming the source; 0 other exceptions, 0 hangs, 0 crashes; "
        f"{_status(outcomes['images'])} |",
        f"| data files | **{data_total:,}** records: {g(data, 'llava_records'):,} LLaVA JSONL, "
        f"{g(data, 'messages_records'):,} `messages`, {g(data, 'parquet_records')} parquet, "
        f"{g(data, 'path_cases')} path cases | `data check` and training agree on every record (same skip, same "
        f"reason); {g(data, 'training_planted_bad_records')} planted bad records in a training run, "
        f"{g(data, 'training_skips_counted')} counted by the trainer; {_status(outcomes['data'])} |",
        f"| training faults | **{g(faults, 'kills_survived')}** SIGKILLs of a 2-process run "
        f"({g(faults, 'kills_inside_checkpoint_writes')} inside checkpoint writes), {g(faults, 'full_disk_cases')} "
        f"full-disk checkpoint write(s) | `latest` always names a complete checkpoint; final weights equal the "
        f"uninterrupted run's bit for bit; {_status(outcomes['faults'])} |",
        _checkpoints_row(checkpoints, outcomes["checkpoints"]),
        f"| loading safety | **{g(loading, 'planted_pickle_cases')}** planted pickles through every loading entry "
        f"point; {g(loading, 'files_scanned')} package files scanned; {g(loading, 'missing_path_cases')} missing "
        f"local paths | no pickle executed; no `eval` / `exec` / unsafe `torch.load` / `trust_remote_code=True`, "
        f"every transformers / peft loader call with `trust_remote_code=False`; no Hub call for a local path; "
        f"{_status(outcomes['loading'])} |",
        _contents_row(contents, _merged(outcomes["custom_code"], outcomes["strict_loading"])),
        f"| serving limits | pixels, images, new tokens, prompt tokens, through the engine, chat, infer and the "
        f"Python API | every request over a limit refused before the model runs, with the limit and its flag "
        f"named; {_status(outcomes['limits'])} |",
        "",
        "## Image input (`tests/processing/test_fuzz_images.py`)",
        "",
        "Seeds: JPEG (baseline, progressive, grey, CMYK, EXIF-rotated), PNG (RGB, RGBA, palette + transparency, grey,"
        " 16-bit, 1-bit, LA, APNG), WebP (lossy, lossless RGBA, animated), TIFF (raw, LZW, deflate, JPEG, PackBits, "
        "CMYK, 16-bit, float, multi-page), GIF (static, transparent, animated), BMP, 16-bit PGM, ICO. Mutations: "
        "truncation, bit flips, byte overwrites, insertions, deletions, extreme 32-bit header words, header sizes "
        "rewritten around the pixel limit, splices of two files, repeated chunks; each decoded from bytes, a path "
        "and a file object, then preprocessed to a tensor.",
        "",
        "| figure | value |",
        "|---|---|",
        f"| mutated files, in process (hypothesis) | {g(images, 'hypothesis_cases'):,} "
        f"({g(images, 'hypothesis_tensors'):,} tensors, {g(images, 'hypothesis_errors'):,} typed errors) |",
        f"| mutated files, child process | {g(images, 'child_cases'):,} ({g(images, 'child_tensor'):,} tensors, "
        f"{g(images, 'child_error'):,} typed errors) |",
        f"| arrays and tensors of any dtype / shape | {g(images, 'array_cases'):,} |",
        f"| truncated and zero-byte files | {g(images, 'truncated_cases')} |",
        f"| decompression-bomb headers (PNG, GIF, BMP, JPEG, TIFF, WebP, PPM) | {g(images, 'bomb_headers')}, each "
        "refused from the header in < 1 s |",
        f"| paths: symlink loop, FIFO, device, directory, missing, NUL | {g(images, 'odd_paths')}, each a typed error "
        "(a FIFO would have blocked forever) |",
        f"| pixel limit while fuzzing | {g(images, 'fuzz_max_pixels'):,} pixels |",
        f"| peak memory growth of the child process | {images.get('child_peak_growth_mb', 0)} MiB (bound asserted: "
        f"{images.get('memory_bound_mb', 0):.0f} MiB = 48 bytes x pixel limit) |",
        f"| slowest case | {images.get('child_slowest_case_s', 0)} s (alarm at 10 s) |",
        "",
        "## Data files (`tests/train/test_fuzz_data.py`)",
        "",
        "Records: valid LLaVA / `messages` records with 0-2 of the faults real files hold (a turn replaced by junk, a"
        " key dropped or of the wrong type, a conversation ending on a user turn, reversed turns, boxes of any shape,"
        " system turns in the middle, placeholder counts off by one), junk records, lines of Latin-1, broken JSON, "
        "lone surrogates; image paths that are missing, unreadable, empty, symlink loops, dangling links, FIFOs, "
        "directories, absolute, `..` escapes. Each record goes through `data check` and through training's dataset: "
        "both must give the same verdict.",
        "",
        "| reason | records |",
        "|---|---|",
        *[f"| {reason} | {n:,} |" for reason, n in sorted(reasons.items(), key=lambda kv: -kv[1])],
        "",
        "Absolute paths and `..` escapes out of the media folder are refused (`image path escapes the media "
        "folder`) unless the dataset entry sets `allow_outside_media: true`.",
        "",
        "## Training faults (`tests/train/test_fault_injection.py`)",
        "",
        "| figure | value |",
        "|---|---|",
        f"| SIGKILLs survived (2 ranks, ZeRO-2, gloo) | {g(faults, 'kills_survived')} of "
        f"{g(faults, 'kills_planned')} planned (a kill planned after the run ended is not counted) |",
        f"| of which inside a checkpoint write | {g(faults, 'kills_inside_checkpoint_writes')} |",
        f"| launches (kills + the final resume) | {g(faults, 'launches')} |",
        f"| final weights equal to an uninterrupted run | {'yes, bit for bit' if faults.get('final_weights_equal_uninterrupted') else 'not measured'} |",
        f"| full disk during a checkpoint write | {g(faults, 'full_disk_cases')} case(s): a writer failing with "
        "ENOSPC, and a 5 MiB tmpfs where mounting one is allowed; the previous checkpoint stays complete and named by"
        " `latest`, the error says so (`CheckpointWriteError`) |",
        "",
        *_checkpoints_section(checkpoints),
        "## Loading safety (`tests/loading/test_loading_safety.py`)",
        "",
        "- Weights are read from safetensors only: PS3 and VILA-HD `from_pretrained`, the VILA layout loader, "
        "`vila_hd.loading.load_pretrained` / `vila_hd.load` (model and LoRA adapter) refuse a directory with only `.bin` / `.pt` "
        "files with a message; `use_safetensors=False` / `weights_only=False` are refused.",
        "- Training resume reads DeepSpeed's files with `torch.load(weights_only=True)` (DeepSpeed itself uses "
        "`weights_only=False`); a planted pickle raises `UnsafeCheckpointError` and is not executed.",
        "- An AST scan of vila_hd/, llava_compat/, train/, eval/ finds no `eval` / `exec`, no `pickle.load`, no "
        "`torch.load` without `weights_only=True`, no `trust_remote_code=True`, no unsafe YAML, and no "
        "`from_pretrained` / `from_config` of a transformers or peft class without `trust_remote_code=False`.",
        "- A local-looking path that does not exist (`./x`, `/abs/x`, `~/x`, `x/y/z`, `../x`) is a "
        "`FileNotFoundError` raised before any Hub call (the tests make every Hub function and socket fail).",
        "",
        *_contents_section(contents),
        "## Serving limits (`tests/serve/test_serving_limits.py`)",
        "",
        "`vila_hd.engine.ServingLimits`, enforced by the engine before the model runs (so `vila-hd chat`, "
        "`vila-hd infer` and `vila_hd.load(...)` all get them); a request over a limit raises `LimitExceeded` "
        "(a `ValueError`) naming the limit, the value and the flag. `none` lifts a limit.",
        "",
        "| limit | default | flag |",
        "|---|---|---|",
        f"| pixels per image (checked from the header, before decoding) | {limits.max_image_pixels:,} | "
        "`--limit-image-pixels` |",
        f"| images per prompt (all turns) | {limits.max_images_per_prompt} | `--limit-images` |",
        f"| `max_new_tokens` a request may ask for | {limits.max_new_tokens} | `--limit-new-tokens` |",
        "| prompt tokens after image expansion | the LLM's context length | `--limit-prompt-tokens` |",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.reliability", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the CI counts instead of the full ones")
    parser.add_argument("--out", default=OUT, help="where to write the document (default: %(default)s)")
    parser.add_argument("--json", help="also keep the measured figures in this JSON file")
    args = parser.parse_args(argv)
    sys.path.insert(0, ROOT)
    with tempfile.TemporaryDirectory() as tmp:
        report, junit = os.path.join(tmp, "figures.json"), os.path.join(tmp, "junit.xml")
        code = run_tests(not args.quick, report, junit)
        if not os.path.exists(report) or not os.path.exists(junit):
            print("the tests did not produce their report; nothing written", file=sys.stderr)
            return code or 1
        with open(report) as f:
            figures = json.load(f)["figures"]
        outcomes = test_outcomes(junit)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"figures": figures, "outcomes": outcomes}, f, indent=1, sort_keys=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(render(figures, outcomes, full=not args.quick))
    print(f"wrote {args.out}", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
