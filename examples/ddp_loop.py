"""The loop of ``timm_loop.py`` on several processes with DDP: each rank trains on its ``DistributedSampler`` share
of every epoch's replayed views.

    torchrun --nproc-per-node 2 examples/ddp_loop.py --store STORE --model resnet18 --epochs 10 --out student.pt

Takes ``timm_loop.py``'s options. The process group uses gloo on CPU and NCCL on CUDA (one GPU a rank).
"""

from __future__ import annotations

import os
import sys

import timm_loop  # beside this file: python puts the script's folder on sys.path
import torch
import torch.distributed as dist


def run() -> None:
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        argv = None
        if cuda:
            local_rank = int(os.environ.get("LOCAL_RANK", 0))
            torch.cuda.set_device(local_rank)
            argv = [*sys.argv[1:], "--device", f"cuda:{local_rank}"]
        timm_loop.main(argv)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    run()
