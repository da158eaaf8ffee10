"""constraints.txt (the versions the suite passes with) agrees with setup.cfg's requirements."""

from __future__ import annotations

import configparser
import os
import re

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([0-9][A-Za-z0-9.+!_-]*)$")
NOT_INSTALLED_HERE = {"flash"}  # flash-attn has no CPU build: that extra is never installed by the Makefile


def pins() -> dict[str, str]:
    found = {}
    with open(os.path.join(ROOT, "constraints.txt")) as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            match = PIN.match(line)
            assert match, f"constraints.txt:{n}: {line!r} is not name==version (pip takes no links as constraints)"
            found[canonicalize_name(match[1])] = match[2]
    return found


def requirements() -> list[tuple[str, Requirement]]:
    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(ROOT, "setup.cfg"))
    groups = {"install_requires": cfg["options"]["install_requires"]}
    groups.update({f"extra {k}": v for k, v in cfg["options.extras_require"].items() if k not in NOT_INSTALLED_HERE})
    return [(group, Requirement(line)) for group, text in groups.items() for line in text.split("\n") if line.strip()]


def test_every_requirement_is_pinned_at_a_version_setup_cfg_allows():
    pinned = pins()
    for group, req in requirements():
        name = canonicalize_name(req.name)
        assert name in pinned, f"setup.cfg {group}: {req.name} has no pin in constraints.txt (run make constraints)"
        assert req.specifier.contains(pinned[name], prereleases=True), (
            f"constraints.txt pins {req.name}=={pinned[name]} outside setup.cfg's {req} ({group}): move the bound "
            "to what the suite passed with")


def test_torch_is_pinned_as_a_release_not_a_build():
    assert "+" not in pins()["torch"]  # a +cpu label would refuse a GPU user's +cuXXX build of the same release
