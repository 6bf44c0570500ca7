"""``stillroom recipes`` lists every registered view recipe with its parameters."""

from __future__ import annotations

import json

from conftest import run_cli

from stillroom.pipelines.views import RECIPES


def test_recipes_lists_every_recipe_with_its_parameters():
    listed = run_cli("recipes", "--json")
    assert listed.returncode == 0, listed.stderr
    got = {r["name"]: r for r in json.loads(listed.stdout)}
    assert set(got) == set(RECIPES) and {"fkd", "imagenet-rrc", "fmnist-rrc-mix"} <= set(got)
    for name, recipe in RECIPES.items():
        assert got[name] == json.loads(json.dumps(recipe.to_dict()))  # every field and the digest
    table = run_cli("recipes")
    assert table.returncode == 0
    rows = {line.split()[0]: line for line in table.stdout.splitlines()[1:-1]}
    assert set(rows) == set(RECIPES)
    assert "0.25/0.25 (1)" in rows["fmnist-rrc-mix"] and "0.08-1" in rows["fkd"] and "224" in rows["fkd"]
