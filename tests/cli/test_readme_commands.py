"""Every command the README shows still parses: ``--help`` of each ``dat-ds`` command it names, ``--dry-run``
of each training line (through ``dat-ds``, the DeepSpeed launcher, torchrun or srun: the same arguments reach
``dat_ds.train``), and the torch-free checks of each ``dat-ds eval`` line. Paths the README makes up
(``/data/...``, weights files, a hostfile, ``runs/...``) are created empty in a temporary folder first: a
dry run checks that inputs exist, not what they hold.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from dat_ds.core.errors import ConfigError
from tests.helpers import REPO, eval_args, fast_cli, run_cli

# Lines of the README's bash blocks that are not dat-ds commands.
OTHER_PROGRAMS = ("uv run pytest", "DS_BUILD_OPS=0 pip install", "rc=$?", "[ $rc -eq", "exit $rc")  # + shell plumbing
RANK_MODULES = {"dat_ds.train": "train", "dat_ds.evaluate": "eval"}


def readme_commands(text: str) -> list[str]:
    """The command lines of the ```bash blocks: continuations joined, comments and shebangs dropped."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in re.sub(r"\s*\\\n\s*", " ", block).splitlines():
            line = re.sub(r"\s+#\s.*$", "", line).strip()
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


def as_dat_ds(line: str) -> tuple[str, list[str]] | None:
    """``(command, args)`` of a line that runs dat-ds in any of the documented ways; None for other programs."""
    if line.startswith(OTHER_PROGRAMS):
        return None
    tokens = shlex.split(line)
    if tokens[:3] == ["uv", "run", "dat-ds"]:
        return tokens[3], tokens[4:]
    for module, command in RANK_MODULES.items():
        if module in tokens:
            return command, tokens[tokens.index(module) + 1:]
    raise AssertionError(f"README line runs neither dat-ds nor a known program: {line!r}")


def materialise(args: list[str], root: Path) -> list[str]:
    """The made-up paths of ``args`` as empty files and folders under ``root``."""
    out = []
    for arg in args:
        key, _, value = arg.partition("=")
        if value.startswith("/data/"):
            folder = root / value.lstrip("/")
            folder.mkdir(parents=True, exist_ok=True)
            arg = f"{key}={folder}"
        elif key == "model.weights":
            (root / value).touch()
        out.append(arg)
    if "--hostfile" in out:
        (root / out[out.index("--hostfile") + 1]).write_text("localhost slots=8\n")
    return out


COMMANDS = [c for c in map(as_dat_ds, readme_commands((REPO / "README.md").read_text())) if c is not None]


def test_the_readme_shows_commands_of_every_kind():
    """The parse below cannot pass vacuously: the README's training, evaluation and launcher lines are found."""
    kinds = {command for command, _ in COMMANDS}
    assert {"demo", "train", "eval"} <= kinds, kinds
    assert sum(command == "train" for command, _ in COMMANDS) >= 5


def test_comments_and_continuations_are_read_as_the_shell_reads_them():
    text = "```bash\n#!/bin/bash\n# a comment\nuv run dat-ds train --recipe demo \\\n    --epochs 2   # why\n```\n"
    assert readme_commands(text) == ["uv run dat-ds train --recipe demo --epochs 2"]
    assert as_dat_ds("srun python -m dat_ds.train --recipe demo") == ("train", ["--recipe", "demo"])
    with pytest.raises(AssertionError, match="neither dat-ds"):
        as_dat_ds("python train.py")


@pytest.mark.parametrize("command", sorted({command for command, _ in COMMANDS}))
def test_each_readme_command_has_help(tmp_path, command):
    proc = fast_cli(tmp_path, command, "--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"usage: dat-ds {command}"), proc.stdout[:200]


@pytest.mark.parametrize("args", [args for command, args in COMMANDS if command == "train"], ids=" ".join)
def test_each_readme_training_line_passes_its_dry_run(tmp_path, args):
    args = materialise(args, tmp_path)
    proc = run_cli("train", *args, *([] if "--dry-run" in args else ["--dry-run"]), cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "config OK" in proc.stderr


@pytest.mark.parametrize("args", [args for command, args in COMMANDS if command == "eval"], ids=" ".join)
def test_each_readme_eval_line_passes_the_torch_free_checks(tmp_path, monkeypatch, args):
    from dat_ds.launch.validate import eval_inputs

    monkeypatch.chdir(tmp_path)
    run = args[args.index("--run") + 1]
    (tmp_path / run).mkdir(parents=True)
    launch_flags = {"--nproc"}  # the launching command's own; the parsed request is what each rank gets
    kept = [a for i, a in enumerate(args) if a not in launch_flags and (i == 0 or args[i - 1] not in launch_flags)]
    eval_inputs(eval_args(*kept))


def test_a_broken_readme_line_would_fail(tmp_path):
    """The dry run really checks: the same kind of line with a misspelt key is refused."""
    proc = fast_cli(tmp_path, "train", "--recipe", "demo", "--set", "atack.eps=0.1", "--dry-run")
    assert proc.returncode == 2
    with pytest.raises(ConfigError):
        from dat_ds.launch.validate import eval_inputs

        eval_inputs(eval_args("--run", str(tmp_path), "--attacks", "autoatack"))
