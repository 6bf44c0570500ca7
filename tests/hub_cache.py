"""An offline Hugging Face hub cache for tests: timm's real pretrained-weights code runs against it."""

from __future__ import annotations

import json
from pathlib import Path

import timm
import torch

HUB_ID = "test_resnet.r160_in1k"  # a timm model name with a pretrained tag whose weights live on the hub


def write_hub_cache(root: Path, model_id: str = HUB_ID, seed: int = 0) -> torch.nn.Module:
    """The Hugging Face cache layout ``hf_hub_download`` reads with ``HF_HUB_OFFLINE=1``: ``hub/models--timm--ID/
    refs/main`` naming a snapshot that holds ``model.safetensors`` and ``config.json``, as timm ships a model.
    The weights: a random ``model_id`` of timm's own class count. Returns that model."""
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model = timm.create_model(model_id, pretrained=False).eval()
    repo = root / "hub" / f"models--timm--{model_id}"
    commit = "0" * 40
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, snapshot / "model.safetensors")
    (snapshot / "config.json").write_text(json.dumps({"architecture": model_id.split(".")[0], "num_classes": 1000,
                                                      "pretrained_cfg": model.pretrained_cfg}))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return model
