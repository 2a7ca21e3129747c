"""The documentation names only things that exist, and has no unfilled template slots."""
import os
import re

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md", "README_cn.md", "benchmarks/README.md", "data/README.md"]
# a script or config named by its path from the repository root
NAMED_PATH = re.compile(r"(?<![\w/.])((?:tools|benchmarks)/\w+\.py|configs/[\w/]+\.ya?ml)")


def read(name):
    with open(os.path.join(REPO, name), encoding="utf-8") as f:
        return f.read()


@pytest.mark.parametrize("name", DOCS)
def test_no_template_slots(name):
    slots = re.findall(r"\{\{[^}]*\}\}", read(name))
    assert not slots, f"{name} has unfilled template slots: {slots}"


@pytest.mark.parametrize("name", DOCS)
def test_named_scripts_and_configs_exist(name):
    named = sorted(set(NAMED_PATH.findall(read(name))))
    missing = [path for path in named if not os.path.exists(os.path.join(REPO, path))]
    assert not missing, f"{name} names files that do not exist: {missing}"


def test_the_path_pattern_finds_what_the_readme_runs():
    # the pattern must see the commands' paths, or the test above checks nothing
    named = set(NAMED_PATH.findall(read("README.md")))
    assert {"tools/train.py", "configs/lvvit/lvvit_tiny.yaml"} <= named
    assert set(NAMED_PATH.findall("see benchmarks/bench_data.py and my/tools/x.py")) == {"benchmarks/bench_data.py"}
