"""Every pipeline command the docs show parses: keys exist, values have their types, configs are found.

A command copied from the README, docs/, cluster/, a config's comments or a pipeline's docstring must not
fail on its arguments (the evaluate docstring's `train_set= test_set=` form once did: the default config's
`dataset` clashed with it). Only the parsing is checked here; the tests beside each pipeline run them.
"""

from __future__ import annotations

import ast
import re
import shlex

import pytest

from deo.config import load_config
from deo.eval.config import EvalConfig, ExportConfig
from deo.ingest.config import IngestConfig
from deo.train.config import PretrainConfig
from deo.tune.config import SweepConfig

from tests_helpers import REPO

PIPELINES = {
    "pretrain": (PretrainConfig, "configs/pretrain/default.yaml"),
    "ingest": (IngestConfig, "configs/ingest/default.yaml"),
    "sweep": (SweepConfig, "configs/sweep/alpha_gamma.yaml"),
    "evaluate": (EvalConfig, "configs/eval/default.yaml"),
    "export": (ExportConfig, "configs/export/default.yaml"),
}
# a command runs to the end of its line, a comment, a closing backquote or parenthesis of the prose around it
COMMAND = re.compile(r"python3? pipelines/(\w+)\.py((?:[^#`)\n\"]|\"[^\"\n]*\")*)")
# `[key=value]` and `[--config PATH]` in a usage line are optional parts: left out (a list value such as
# baselines=[random,pixels] follows an '=', not a space, so it stays)
OPTIONAL = re.compile(r"(?<=\s)\[[^\[\]]*(?:\[[^\[\]]*\][^\[\]]*)*\]")


def _texts():
    for path in [REPO / "README.md", REPO / "data/samples/README.md", *sorted((REPO / "docs").glob("*.md")),
                 *sorted(p for p in (REPO / "cluster").rglob("*") if p.is_file()),
                 *sorted((REPO / "configs").rglob("*.yaml"))]:
        yield path, path.read_text()
    for path in sorted((REPO / "pipelines").glob("*.py")):  # the docstring, not the code
        yield path, ast.get_docstring(ast.parse(path.read_text())) or ""


def documented_commands() -> list[tuple[str, str, list[str]]]:
    """(where, pipeline, arguments) of each command, continuation lines joined (`#` ones in YAML comments too)."""
    found = []
    for path, text in _texts():
        text = re.sub(r"\\\n\s*#?\s*", " ", text)
        for line in text.splitlines():
            for m in COMMAND.finditer(line):
                args = shlex.split(OPTIONAL.sub("", m.group(2)))
                found.append((f"{path.relative_to(REPO)}: {m.group(0).strip()}", m.group(1), args))
    return found


COMMANDS = documented_commands()


def test_the_docs_show_every_pipeline():
    assert {name for _, name, _ in COMMANDS} == set(PIPELINES)
    assert len(COMMANDS) >= 30, [w for w, _, _ in COMMANDS]


@pytest.mark.parametrize(("where", "name", "args"), COMMANDS, ids=[w[:90] for w, _, _ in COMMANDS])
def test_a_documented_command_parses(where, name, args, monkeypatch, capsys):
    monkeypatch.chdir(REPO)  # the docs run from the repository root
    cls, default = PIPELINES[name]
    if "--config" in args:
        i = args.index("--config")
        if args[i + 1].startswith("runs/"):  # written by an earlier documented step (a sweep's best.yaml)
            args = args[:i] + args[i + 2:]
    if "--help" in args:
        with pytest.raises(SystemExit) as e:
            load_config(cls, args, default)
        assert e.value.code == 0 and "usage:" in capsys.readouterr().out
        return
    load_config(cls, args, default)


@pytest.mark.parametrize("name", sorted(PIPELINES))
def test_every_pipeline_prints_its_help_and_exits_0(name):
    """As a user runs it: pretrain.py --help once ended in an UnboundLocalError after printing."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, f"pipelines/{name}.py", "--help"], cwd=REPO, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and "usage:" in r.stdout and not r.stderr.strip(), r.stderr[-2000:]
