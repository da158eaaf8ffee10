"""Fault injection in training: a crash or a full disk costs the steps since the last checkpoint, never the run.

- A 2-process run (DeepSpeed ZeRO-2, gloo on CPU; ranks started directly with the launcher's environment) is
  killed with SIGKILL at random moments -- at optimizer steps, inside checkpoint writes (between DeepSpeed's
  files, before the rename that publishes a checkpoint, before ``latest`` moves), at random times, one rank first
  or both at once -- and resumed each time. After every kill no ``step_*`` directory is half-written and
  ``latest`` names a complete checkpoint; the final weights equal an uninterrupted run's, bit for bit.
- A disk that fills up during a checkpoint write (a writer failing with ENOSPC; a 5 MiB tmpfs where the system
  allows mounting one) leaves the previous checkpoint complete and named by ``latest``; the run resumes from it
  and ends with the uninterrupted weights.

The default run survives a handful of kills; ``pytest --reliability-full`` (``python -m tests.reliability``) more.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import testpaths
import torch
import yaml
from safetensors.torch import load_file
from train_helpers import fresh_job_env, make_dataset, stage_dict

pytest.importorskip("deepspeed")

TESTS = testpaths.TESTS_DIR
ROOT = os.path.dirname(TESTS)
WORLD = 2
STEPS = 6  # the CI run; the full run trains 12 steps, so that more kills land before the end
PAUSE = 0.15  # seconds each checkpoint event is held in killed runs: the kill lands inside the write


def recipe(data: str, out: str, steps: int = STEPS) -> dict:
    """A tiny ZeRO-2 fp32 stage, a checkpoint every 2 steps; no gradient checkpointing (speed)."""
    cfg = stage_dict(data, out, max_steps=steps, **{"checkpoint.every_steps": 2, "checkpoint.keep_last": 2})
    cfg["gradient_checkpointing"] = {"llm": False, "vision_tower": False}
    return cfg


# --- launching and killing ----------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Run:
    """Both ranks of one launch, each in its own process group; events read from their files."""

    def __init__(self, config: str, events: str, pause: float, log: str):
        self.events = events
        for rank in range(WORLD):
            path = f"{events}.rank{rank}"
            if os.path.exists(path):
                os.remove(path)
        env = fresh_job_env()
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE=str(WORLD),
                   LOCAL_WORLD_SIZE=str(WORLD), PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""),
                   OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
        code = f"import sys; sys.path[:0] = [{TESTS!r}, {ROOT!r}]; import fault_child; sys.exit(fault_child.main(sys.argv[1:]))"
        self.log = open(log, "a")
        self.procs = [subprocess.Popen([sys.executable, "-c", code, events, str(pause), config],
                                       env=dict(env, RANK=str(r), LOCAL_RANK=str(r)), stdout=self.log,
                                       stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
                      for r in range(WORLD)]
        self.started = time.monotonic()

    def read(self, rank: int = 0) -> list[tuple[float, str, str]]:
        try:
            with open(f"{self.events}.rank{rank}") as f:
                lines = f.read().splitlines()
        except FileNotFoundError:
            return []
        out = []
        for line in lines:
            parts = line.split(" ", 2)
            if len(parts) == 3:
                out.append((float(parts[0]), parts[1], parts[2]))
        return out

    def running(self) -> bool:
        return all(p.poll() is None for p in self.procs)

    def wait_for(self, kind: str, count: int, timeout: float = 300.0) -> bool:
        """Block until rank 0 reported ``count`` events of ``kind`` (True), or the run ended (False)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if sum(1 for _, k, _ in self.read() if k == kind) >= count:
                return True
            if not self.running():
                return False
            time.sleep(0.01)
        raise TimeoutError(f"no {count} '{kind}' events after {timeout} s")

    def kill(self, one_rank_first: bool) -> bool:
        """SIGKILL: both ranks at once (a node lost), or rank 1 then, 0.3 s later, rank 0 (a rank crashed and
        the scheduler took the job down). True when the kill hit running processes."""
        alive = self.running()
        order = [self.procs[1], self.procs[0]] if one_rank_first else self.procs
        for i, proc in enumerate(order):
            if one_rank_first and i == 1:
                time.sleep(0.3)
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        self.wait()
        return alive

    def wait(self, timeout: float = 600.0) -> list[int]:
        codes = [p.wait(timeout=timeout) for p in self.procs]
        self.log.close()
        return codes


# --- invariants -----------------------------------------------------------------------------------------------
def complete(path: str) -> bool:
    """Everything a resume of WORLD ranks reads is there."""
    need = ["trainer_state.json", "engine/mp_rank_00_model_states.pt"]
    need += [f"engine/zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(WORLD)]
    need += [f"rng/rank_{r:05d}.pt" for r in range(WORLD)]
    return all(os.path.isfile(os.path.join(path, n)) and os.path.getsize(os.path.join(path, n)) > 0 for n in need)


def check_checkpoints(out: str) -> str | None:
    """No half-written ``step_*`` directory; ``latest`` (if any) names a complete one. Returns that name."""
    root = os.path.join(out, "checkpoints")
    if not os.path.isdir(root):
        return None
    for name in os.listdir(root):
        if name.startswith("step_"):
            assert complete(os.path.join(root, name)), f"{name} is a half-written checkpoint: " + str(
                sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(os.path.join(root, name))
                       for f in fs))
    latest = os.path.join(root, "latest")
    if not os.path.exists(latest):
        return None
    with open(latest) as f:
        name = f.read()
    assert name.startswith("step_") and complete(os.path.join(root, name)), f"latest names {name!r}"
    from vila_hd.train.checkpoint import find_latest

    assert find_latest(out) == os.path.join(root, name)
    return name


def final_weights(out: str) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(out, "final", "model.safetensors"))


def assert_same_weights(got: dict, ref: dict) -> None:
    assert sorted(got) == sorted(ref)
    different = [k for k in ref if not torch.equal(got[k], ref[k])]
    assert not different, f"{len(different)} tensors differ from the uninterrupted run, e.g. {different[:3]}"


# --- the schedule of kills ----------------------------------------------------------------------------------------
def kill_schedule(count: int, seed: int) -> list[dict]:
    """``count`` kills: the first ones aim at each kind of moment, the rest are drawn at random."""
    rng = random.Random(seed)
    aimed = [
        {"event": "write", "nth": 2},  # between DeepSpeed's files of a checkpoint
        {"event": "publish", "nth": 1},  # everything written, the directory not renamed yet
        {"event": "atomic", "nth": 2},  # checkpoint published, ``latest`` not moved yet
        {"event": "step", "nth": 1, "one_rank_first": True},
        {"event": "time"},
    ]
    plan = aimed[:count]
    while len(plan) < count:
        kind = rng.choice(["write", "publish", "atomic", "step", "time", "time"])
        plan.append({"event": kind, "nth": rng.randint(1, 3)})
    for kill in plan:
        kill.setdefault("one_rank_first", rng.random() < 0.3)
        kill["delay"] = rng.uniform(0.0, 2.0) if kill["event"] == "time" else rng.uniform(0.0, PAUSE)
    return plan


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(str(tmp_path_factory.mktemp("data")), n=8)


@pytest.fixture(scope="module")
def steps(reliability) -> int:
    return reliability.count(STEPS, 2 * STEPS)


@pytest.fixture(scope="module")
def reference(data, steps, tmp_path_factory):
    """The uninterrupted 2-process run."""
    folder = tmp_path_factory.mktemp("reference")
    out = str(folder / "run")
    config = str(folder / "cfg.yaml")
    with open(config, "w") as f:
        yaml.safe_dump(recipe(data, out, steps), f)
    run = Run(config, str(folder / "events"), 0.0, str(folder / "log.txt"))
    codes = run.wait()
    assert codes == [0, 0], open(folder / "log.txt").read()[-4000:]
    return final_weights(out)


def test_sigkill_at_random_moments_then_resume(data, steps, reference, tmp_path, reliability):
    kills = reliability.count(3, 12)
    seed = random.randrange(1 << 30) if reliability.full else 7
    out = str(tmp_path / "run")
    config = str(tmp_path / "cfg.yaml")
    with open(config, "w") as f:
        yaml.safe_dump(recipe(data, out, steps), f)
    log = str(tmp_path / "log.txt")
    survived, landed_in_checkpoint, launches = 0, 0, 0
    for kill in kill_schedule(kills, seed):
        run = Run(config, str(tmp_path / "events"), PAUSE, log)
        launches += 1
        if kill["event"] == "time":
            hit = run.wait_for("step", 1)  # the processes are up; then a random moment
            time.sleep(kill["delay"])
        else:
            hit = run.wait_for(kill["event"], kill["nth"])
            time.sleep(kill["delay"])
        if not hit or not run.kill(kill["one_rank_first"]):
            run.wait()
            break  # the run finished before this kill: nothing left to interrupt
        survived += 1
        last = run.read()[-1][1] if run.read() else ""
        landed_in_checkpoint += last in ("write", "atomic", "publish")
        check_checkpoints(out)
    final = Run(config, str(tmp_path / "events"), 0.0, log)
    launches += 1
    assert final.wait() == [0, 0], open(log).read()[-4000:]
    check_checkpoints(out)
    assert not [n for n in os.listdir(os.path.join(out, "checkpoints")) if n.startswith(".tmp-")]
    assert_same_weights(final_weights(out), reference)
    assert survived >= min(kills, 3), survived
    reliability.add("faults", "kills_survived", survived)
    reliability.add("faults", "kills_inside_checkpoint_writes", landed_in_checkpoint)
    reliability.add("faults", "launches", launches)
    reliability.add("faults", "kills_planned", kills)
    reliability.record("faults", "final_weights_equal_uninterrupted", True)


# --- a full disk --------------------------------------------------------------------------------------------
def _single_process_env():
    return fresh_job_env()


def test_failing_checkpoint_writer_leaves_the_previous_checkpoint_usable(data, tmp_path, monkeypatch, reliability):
    """ENOSPC on the 3rd file of the step-4 checkpoint: the save fails loudly, step 2 stays complete and named by
    ``latest``; a restart resumes from it and ends where an uninterrupted run does."""
    from vila_hd.train import checkpoint as ckpt
    from vila_hd.train.config import stage_from_dict
    from vila_hd.train.stage import run_stage

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reference = str(tmp_path / "reference")
        run_stage(stage_from_dict(recipe(data, reference)))
        out = str(tmp_path / "run")
        save, calls = torch.save, []

        def full_disk(obj, path, *args, **kwargs):
            if ".tmp-step_00000004" in str(path):
                calls.append(path)
                if len(calls) == 2:
                    with open(path, "wb") as f:  # a partial file, as a write that ran out of space leaves
                        f.write(b"PK\x03\x04")
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
            return save(obj, path, *args, **kwargs)

        monkeypatch.setattr(torch, "save", full_disk)
        with pytest.raises(ckpt.CheckpointWriteError, match="could not write checkpoint step_00000004 .*No space left "
                           "on device.*The previous checkpoint \\(step_00000002\\) is untouched"):
            run_stage(stage_from_dict(recipe(data, out)))
        monkeypatch.setattr(torch, "save", save)
        root = os.path.join(out, "checkpoints")
        assert sorted(os.listdir(root)) == [".tmp-step_00000004", "latest", "step_00000002"]
        assert ckpt.find_latest(out) == os.path.join(root, "step_00000002")
        assert ckpt.read_state(ckpt.find_latest(out))["step"] == 2
        run_stage(stage_from_dict(recipe(data, out)))  # the restart: resumes from step 2
        assert sorted(os.listdir(root)) == ["latest", "step_00000004", "step_00000006"]
        assert_same_weights(final_weights(out), final_weights(reference))
    finally:
        torch.set_num_threads(threads)
    reliability.add("faults", "full_disk_cases", 1)


def _can_mount_tmpfs(path: str) -> bool:
    if sys.platform != "linux" or shutil.which("mount") is None:
        return False
    os.makedirs(path, exist_ok=True)
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", path], capture_output=True).returncode == 0
    if ok:
        subprocess.run(["umount", path], capture_output=True)
    return ok


def test_real_full_disk_on_a_small_tmpfs(data, tmp_path, reliability):
    """The checkpoints live on a tmpfs with room for one checkpoint and a half (5 MiB; one is 3.1 MiB): the second save runs out of space
    (ENOSPC from the kernel, in whichever file); the first checkpoint stays usable and the run resumes from it
    once space is freed (here: a larger tmpfs holding the same files)."""
    mount = str(tmp_path / "disk")
    if not _can_mount_tmpfs(mount):
        pytest.skip("mounting a tmpfs needs privileges this machine does not give")
    out = str(tmp_path / "run")
    os.makedirs(os.path.join(out, "checkpoints"))
    config = recipe(data, out)
    config["checkpoint"]["keep_last"] = 1
    path = str(tmp_path / "cfg.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(config, f)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=5m", "tmpfs", os.path.join(out, "checkpoints")], check=True)
    try:
        code = f"import sys; sys.path[:0] = [{TESTS!r}, {ROOT!r}]; import fault_child; sys.exit(fault_child.main(sys.argv[1:]))"
        proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "events"), "0", path],
                              env=_single_process_env(), capture_output=True, text=True, timeout=600, cwd=ROOT)
        assert proc.returncode != 0, proc.stderr[-3000:]
        assert "CheckpointWriteError: could not write checkpoint step_00000004" in proc.stderr, proc.stderr[-3000:]
        assert "the disk is full" in proc.stderr and "latest` still names it" in proc.stderr
        root = os.path.join(out, "checkpoints")
        name = check_checkpoints_single(out)
        assert name == "step_00000002", os.listdir(root)
        saved = str(tmp_path / "saved")
        shutil.copytree(root, saved, symlinks=True)
    finally:
        subprocess.run(["umount", os.path.join(out, "checkpoints")], check=True)
    shutil.rmtree(os.path.join(out, "checkpoints"))
    shutil.copytree(saved, os.path.join(out, "checkpoints"))  # "space freed": the same files on a bigger disk
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "events"), "0", path],
                          env=_single_process_env(), capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout + proc.stderr
    reliability.add("faults", "full_disk_cases", 1)


def check_checkpoints_single(out: str) -> str | None:
    """``latest`` of a one-process run names a complete checkpoint (returns its name)."""
    root = os.path.join(out, "checkpoints")
    with open(os.path.join(root, "latest")) as f:
        name = f.read()
    need = ["trainer_state.json", "engine/mp_rank_00_model_states.pt", "engine/zero_pp_rank_0_mp_rank_00_optim_states.pt",
            "rng/rank_00000.pt"]
    assert all(os.path.getsize(os.path.join(root, name, n)) > 0 for n in need), name
    json.load(open(os.path.join(root, name, "trainer_state.json")))
    return name


def test_a_kill_while_old_checkpoints_are_deleted_leaves_no_half_deleted_step(tmp_path, monkeypatch):
    """Pruning (and replacing a re-saved step) renames a checkpoint away in one step before deleting it: a kill
    in the middle of the deletion leaves a ``.tmp-`` directory, removed at the next start, never a partial
    ``step_*`` that could look complete."""
    from vila_hd.train import checkpoint as ckpt

    out = str(tmp_path)
    root = ckpt.checkpoint_root(out)
    for step in (2, 4, 6):
        os.makedirs(os.path.join(root, ckpt.step_name(step), "engine"))
        for name in ("engine/a.pt", "engine/b.pt", ckpt.STATE_FILE):
            with open(os.path.join(root, ckpt.step_name(step), name), "w") as f:
                f.write(json.dumps({"step": step}))
    with open(os.path.join(root, ckpt.LATEST), "w") as f:
        f.write(ckpt.step_name(6))
    rmtree = shutil.rmtree

    def killed_midway(path, ignore_errors=False):
        if os.path.basename(path).startswith(".tmp-removed-") and os.path.exists(path):
            os.remove(os.path.join(path, "engine", "a.pt"))  # part of the deletion happened...
            raise KeyboardInterrupt  # ...then the process died
        return rmtree(path, ignore_errors=ignore_errors)

    monkeypatch.setattr(ckpt.shutil, "rmtree", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        ckpt.prune(root, keep_last=2)
    monkeypatch.setattr(ckpt.shutil, "rmtree", rmtree)
    assert sorted(os.listdir(root)) == [".tmp-removed-step_00000002", "latest", "step_00000004", "step_00000006"]
    assert [os.path.basename(p) for _, p in ckpt.complete_checkpoints(root)] == ["step_00000004", "step_00000006"]
    ckpt.clean_partial(out)
    assert sorted(os.listdir(root)) == ["latest", "step_00000004", "step_00000006"]
