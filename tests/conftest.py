"""Shared pytest setup. Fixtures used by several test files go here."""

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip `@pytest.mark.gpu` tests on machines without CUDA (they run where a GPU is lent)."""
    import torch  # imported here so that collecting a CPU-only subset stays cheap

    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


# --- the tiny VILA-HD ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory):
    """A directory holding the tiny random-weight VILA-HD (preset ``tiny``, seed 0) and its processor, written
    once per session and shared by every test that loads it: load it, never write into it (copy it first)."""
    from serving_helpers import save_tiny_checkpoint

    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny-checkpoint"))


@pytest.fixture(scope="module")
def tiny(request: pytest.FixtureRequest):
    """``(model, processor)`` of the ``tiny`` preset, seeded with the module's ``TINY_SEED`` (default 0). Built
    once per test module (a few ms), not per session: tests may train the model or change it in place."""
    from vila_hd.builder import build_tiny_model

    return build_tiny_model("tiny", seed=getattr(request.module, "TINY_SEED", 0))


# --- reliability counts (tests/reliability.py regenerates docs/reliability.md from them) ----------------------
def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("reliability")
    group.addoption(
        "--reliability-full",
        action="store_true",
        help="run the fuzzers and fault-injection tests at full counts (slow; see docs/reliability.md)",
    )
    group.addoption(
        "--reliability-report", metavar="JSON", help="write what the reliability tests tried and found to JSON"
    )


class Reliability:
    """Counts of the fuzzing / fault-injection tests: ``count(default, full)`` picks the size of a run,
    ``record(section, key, value)`` keeps a measured figure for the report."""

    def __init__(self, full: bool):
        self.full = full
        self.figures: dict[str, dict] = {}

    def count(self, default: int, full: int) -> int:
        return full if self.full else default

    def record(self, section: str, key: str, value) -> None:
        self.figures.setdefault(section, {})[key] = value

    def add(self, section: str, key: str, value: int) -> None:
        figures = self.figures.setdefault(section, {})
        figures[key] = figures.get(key, 0) + value


_RELIABILITY: Reliability | None = None


@pytest.fixture(scope="session")
def reliability(request: pytest.FixtureRequest) -> Reliability:
    global _RELIABILITY
    if _RELIABILITY is None:
        _RELIABILITY = Reliability(bool(request.config.getoption("--reliability-full")))
    return _RELIABILITY


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    path = session.config.getoption("--reliability-report", default=None)
    if path and _RELIABILITY is not None:
        import json

        with open(path, "w") as f:
            json.dump({"full": _RELIABILITY.full, "figures": _RELIABILITY.figures}, f, indent=1, sort_keys=True)
