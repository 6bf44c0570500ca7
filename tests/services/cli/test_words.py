"""Issue 32's smaller defects: what the CLI says (help of --no-progress and of serve's options, the token file
`stillroom jobs` looks for), `serve` with its port taken leaving nothing on disk, and a mixing recipe refusing a
split whose partner ids float32 cannot hold."""

from __future__ import annotations

import argparse
import socket

import numpy as np
import pytest

from stillroom.pipelines.core import UsageError
from stillroom.pipelines.views import draw_views, get_recipe
from stillroom.services.cli import build_parser, main


def _sub(command: str) -> argparse.ArgumentParser:
    parser = build_parser(command)
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[command]


def test_no_progress_says_it_hides_the_bar():
    flag = next(a for a in _sub("train")._actions if "--no-progress" in a.option_strings)
    assert flag.help == "hide the progress bar"


def test_every_serve_option_has_help():
    silent = [a.option_strings for a in _sub("serve")._actions if a.option_strings and not a.help]
    assert silent == []


def test_serve_with_its_port_taken_makes_no_state_dir(tmp_path, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        state = tmp_path / "state"
        assert main(["serve", "--port", str(port), "--state-dir", str(state)]) == 2
    assert f"port {port} on 127.0.0.1 is in use" in capsys.readouterr().err
    assert not state.exists()


def test_jobs_without_a_token_names_the_state_dir_it_looked_in(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("STILLROOM_API_TOKEN", raising=False)
    state = tmp_path / "elsewhere"
    assert main(["jobs", "--state-dir", str(state), "ls"]) != 0
    err = capsys.readouterr().err
    assert f"no API token in {state / 'api_token'}" in err and "--state-dir" in err


def test_a_mixing_recipe_refuses_more_samples_than_float32_partner_ids_hold():
    deit = get_recipe("deit")
    with pytest.raises(UsageError, match="partner ids are stored as float32, exact up to 16,777,216"):
        draw_views(deit, 0, np.arange(4), 2**24 + 1, (32, 32))
    assert draw_views(get_recipe("imagenet-rrc"), 0, np.arange(4), 2**24 + 1, (32, 32)).shape[0] == 4  # no mixing
