"""The install files agree: every range in requirements*.txt admits the exact version constraints.txt pins, and
environment.yml states the same ranges, so the README's commands install what CI tested."""

import os
import re

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.helpers import REPO, cli_defaults


def read_requirements(name: str) -> dict:
    out = {}
    for line in open(os.path.join(REPO, name)):
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-r"):
            req = Requirement(line)
            out[canonicalize_name(req.name)] = req.specifier
    return out


def read_constraints() -> dict:
    out = {}
    for line in open(os.path.join(REPO, "constraints.txt")):
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            out[canonicalize_name(name)] = version
    return out


RANGES = {**read_requirements("requirements.txt"), **read_requirements("requirements-dev.txt")}


@pytest.mark.parametrize("name", sorted(RANGES))
def test_constraints_pin_a_version_inside_each_range(name):
    pins = read_constraints()
    assert name in pins, f"constraints.txt pins no version of {name}"
    assert RANGES[name].contains(pins[name]), f"constraints.txt pins {name}=={pins[name]} outside {RANGES[name]}"


def test_environment_yml_states_the_same_ranges():
    text = open(os.path.join(REPO, "environment.yml")).read()
    stated = {}
    for line in text.split("dependencies:", 1)[1].splitlines():
        m = re.match(r"\s+-\s+([A-Za-z][\w.-]*)\s*([<>=!~][^#]*)?$", line)
        if m and m.group(1) not in ("python", "pip"):
            stated[canonicalize_name(m.group(1))] = Requirement(f"{m.group(1)}{m.group(2) or ''}").specifier
    assert stated == RANGES


def test_cli_defaults_resolve_flags_to_false():
    # click >= 8.2.2 stores a sentinel as the default of a flag option; options built from it turned flags on.
    import train

    defaults = cli_defaults(train.main)
    flags = [p.name for p in train.main.params if getattr(p, "is_flag", False)]
    assert flags and all(defaults[name] in (False, True) for name in flags)
    assert defaults["cond"] is False and defaults["batch"] == 512
