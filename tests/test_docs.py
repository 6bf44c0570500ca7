"""The docs' commands are run, so docs and code cannot drift.

Every ```bash block of Getting started and of the own-loop guide runs, in order, in one shell, in an empty
directory, at a tiny size; the ```python blocks with a ``title="FILE"`` are written to FILE first. A block after
``<!-- not-run: REASON -->`` (a cluster, S3, minutes) is not run; its commands, and those of every other page,
are checked against the parser: the ``stillroom`` subcommand exists and so does each ``--flag``; a ``make``
command's target is in the Makefile.

The documented substitutions that shrink a command (a tiny image folder made here in place of ``/data/pets``,
one epoch, 32 px views, a tiny timm model, batches built in the training process) are ``SHRINK`` below.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import signal
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stillroom.services.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
RUN = ["getting-started.md", "guides/own-loop.md"]  # run in this order, in one shell
NOT_RUN = re.compile(r"<!--\s*not-run:\s*(?P<why>[^>]*?)\s*-->\s*$")
FENCE = re.compile(r"^```(?P<lang>\w+)?(?P<attrs>[^\n]*)\n(?P<body>.*?)^```\s*$", re.M | re.S)
SHRINK = [  # (pattern, replacement): the documented ways a command is made tiny for the test
    (r"/data/pets", "pets"),  # the tiny image folder this test makes
    (r"--epochs \d+", "--epochs 1"),
    (r"size=112", "size=32"),
    (r"--model resnet18|--student resnet18", lambda m: m.group(0).replace("resnet18", "test_resnet")),
    (r"resnet18@", "test_resnet@"),
    (r"--out runs/", "--loader-workers 0 --out runs/"),  # 48 images: a loader process costs more than it saves
]


def blocks(page: Path) -> list[tuple[str, str, str, str | None]]:
    """``(lang, attrs, body, not-run reason or None)`` of each fenced block of a page, in order."""
    text = page.read_text()
    found = []
    for m in FENCE.finditer(text):
        before = text[:m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        why = NOT_RUN.search(before)
        found.append((m["lang"] or "", m["attrs"].strip(), m["body"], why["why"] if why else None))
    return found


def commands(body: str) -> list[str]:
    """The shell commands of a block: continuation lines joined, comments and blank lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", body)
    return [line.split(" #", 1)[0].strip() for line in joined.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def shrink(command: str) -> str:
    for pattern, replacement in SHRINK:
        command = re.sub(pattern, replacement, command)
    return command


def flags_of(parser: argparse.ArgumentParser) -> set[str]:
    """Every option string of a parser and of the subcommands under it (a line may name alternatives)."""
    found = {s for a in parser._actions for s in a.option_strings}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found |= flags_of(sub)
    return found


def check_stillroom(command: str, parser: argparse.ArgumentParser) -> list[str]:
    """What is wrong with one ``stillroom ...`` line: an unknown subcommand or an unknown flag."""
    words = shlex.split(command.replace("[", " ").replace("]", " ").replace("|", " | "))[1:]
    chain, takes_value = [parser], False
    for word in words:
        subs = [a for a in chain[-1]._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            break
        if takes_value:  # the value of the option before it
            takes_value = False
        elif word.startswith("-"):
            action = chain[-1]._option_string_actions.get(word)
            takes_value = action is not None and action.nargs != 0 and "=" not in word
        elif word in subs[0].choices:
            chain.append(subs[0].choices[word])
        else:
            return [f"{command!r}: no subcommand {word!r} (expected one of {', '.join(subs[0].choices)})"]
    known = set().union(*({s for a in p._actions for s in a.option_strings} for p in chain[:-1]), flags_of(chain[-1]))
    return [f"{command!r}: no option {flag}" for flag in re.findall(r"(?<![\w-])--[a-z][\w-]*", command)
            if flag.split("=")[0] not in known]


def check_line(command: str, parser: argparse.ArgumentParser) -> list[str]:
    words = command.split()
    if not words:
        return []
    if words[0] == "stillroom":
        return check_stillroom(command, parser)
    if words[0] == "make":
        targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M))
        return [f"{command!r}: no make target {t}" for t in words[1:] if t not in targets]
    return []


def test_every_documented_command_exists_in_the_parser():
    parser = build_parser()
    problems, checked = [], 0
    for page in sorted(DOCS.rglob("*.md")) + [ROOT / "README.md"]:
        for lang, _, body, _ in blocks(page):
            if lang not in ("bash", "sh"):
                continue
            for command in commands(body):
                for part in re.split(r"\s*(?:&&|\|\s|;)\s*|\$\(", command):  # each command of a pipe or chain
                    checked += part.strip().startswith("stillroom")
                    problems += [f"{page.relative_to(ROOT)}: {p}" for p in check_line(part.strip(), parser)]
    assert checked >= 20, f"only {checked} stillroom commands found in the docs: is the block syntax still ```bash?"
    assert not problems, "\n".join(problems)


def test_the_check_finds_a_wrong_subcommand_flag_or_target():
    parser = build_parser()
    assert check_line("stillroom store inspect stores/KEY --json", parser) == []
    assert check_line("stillroom jobs --url http://h:8000 logs ID --follow", parser) == []
    assert "no option --no-such-flag" in check_line("stillroom train --store K --no-such-flag 1", parser)[0]
    assert "no subcommand 'lable'" in check_line("stillroom lable --seeds 0-1", parser)[0]
    assert "no make target docs" in check_line("make docs", parser)[0]


def test_every_block_to_run_is_marked_or_run():
    """The pages whose commands run hold no other shell block by mistake (a ```shell would escape the test)."""
    for name in RUN:
        for lang, _, _, _ in blocks(DOCS / name):
            assert lang in ("bash", "python", "text", "yaml", "json", ""), \
                f"{name}: a ```{lang} block is neither run nor checked"


def image_folder(root: Path, classes: int = 6, per_class: int = 8) -> None:
    """A folder of class folders of small JPEGs of several sizes (the classes differ in brightness)."""
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            h, w = rng.integers(36, 60, size=2)
            pixels = np.clip(rng.normal(30 + 40 * c, 30, size=(h, w, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / f"class{c}" / f"{i}.jpg", quality=90)


def shell_script(tmp_path: Path) -> str:
    lines = ["set -euo pipefail"]
    for name in RUN:
        for lang, attrs, body, why in blocks(DOCS / name):
            title = re.search(r'title="([^"]+)"', attrs)
            if lang == "python" and title:
                (tmp_path / title[1]).write_text(body)
            elif lang == "bash" and why is None:
                lines += [shrink(c) for c in commands(body)]
    return "\n".join(lines) + "\n"


@pytest.mark.slow  # starts its own local Ray (stillroom label), as a user's first run does
def test_getting_started_and_own_loop_run(tmp_path):
    image_folder(tmp_path / "pets")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, line in (("stillroom", f'exec {sys.executable} -m stillroom.services.cli "$@"'),
                       ("python3", f'exec {sys.executable} "$@"'), ("python", f'exec {sys.executable} "$@"')):
        (bin_dir / name).write_text(f"#!/bin/bash\n{line}\n")
        (bin_dir / name).chmod(stat.S_IRWXU)
    script = shell_script(tmp_path)
    assert "stillroom label" in script and "own_loop.py" in script, script
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
           "STILLROOM_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1",
           "RAY_raylet_start_wait_time_s": "180"}  # a local Ray on a loaded machine: wait, don't fail
    shell = subprocess.Popen(["bash", "-c", script], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:  # about 40 s of CPU; the wall time is the machine's load
        out, err = shell.communicate(timeout=900)
    finally:
        if shell.poll() is None:
            os.killpg(shell.pid, signal.SIGKILL)  # the commands it started, not only bash
            shell.communicate()
    done = subprocess.CompletedProcess(shell.args, shell.returncode, out, err)
    assert done.returncode == 0, f"{script}\n--- stdout\n{done.stdout[-3000:]}\n--- stderr\n{done.stderr[-5000:]}"
    assert (tmp_path / "runs/kd/last.pt").exists() and (tmp_path / "own_loop.pt").exists()
    assert "epoch 0: loss" in done.stdout
    assert '"top1"' in done.stdout  # stillroom eval's JSON
