"""Distil a timm model from a stillroom label store in your own training loop, written as timm's ``train.py`` is.

    python examples/timm_loop.py --store STORE --model resnet18 --epochs 10 --batch-size 128 --out student.pt

``STORE`` is a label store's directory, URL or cache key (with ``--store-root``). The loop is timm's: the model,
optimizer and schedule come from timm's factories, the loss is our own function; stillroom gives the data
(``ReplayDataset``: each epoch's views, replayed bit for bit as the teacher saw them, with its stored labels), the
teacher's distribution at any temperature (``soft_targets``), the mixed ground truth of mixed views (``mixing``)
and the student's normalisation (``input_config``). Under ``torchrun`` (``examples/ddp_loop.py``) the same loop
runs on every rank, each on its own ``DistributedSampler`` share. The last line printed is a JSON record.
"""

from __future__ import annotations

import argparse
import json

import timm
import torch
import torch.nn.functional as F
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from torch.utils.data import DataLoader, DistributedSampler

import stillroom


def kd_loss(logits: torch.Tensor, batch: stillroom.Batch, T: float, alpha: float) -> torch.Tensor:
    """Hinton KD: ``(1 - alpha) CE(s, y_mixed) + alpha T^2 KL(p_T || softmax(s / T))``, ``p_T`` the teacher's
    distribution rebuilt from the store's top-k and tail at temperature ``T``."""
    hard = -(stillroom.mixing(batch).targets * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
    soft = F.kl_div(F.log_softmax(logits / T, dim=1), stillroom.soft_targets(batch, T), reduction="batchmean")
    return (1 - alpha) * hard + alpha * T * T * soft


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--store", required=True, help="label store: directory, URL or cache key under --store-root")
    p.add_argument("--store-root", default=None)
    p.add_argument("--model", default="resnet18")
    p.add_argument("--model-kwargs", type=json.loads, default={}, help="JSON, e.g. '{\"img_size\": 32}'")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("-b", "--batch-size", type=int, default=128)
    p.add_argument("--opt", default="adamw")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup-epochs", type=int, default=0)
    p.add_argument("--temperature", type=float, default=4.0)
    p.add_argument("--alpha", type=float, default=0.5, help="weight of the teacher's term (0: ground truth only)")
    p.add_argument("-j", "--workers", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="where to save the student's weights")
    p.add_argument("--seen", default=None, help="JSON file of the ids this rank saw in epoch 0 ({rank}: the rank)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    rank = torch.distributed.get_rank() if distributed else 0
    device = torch.device(args.device)
    torch.manual_seed(args.seed)

    dataset = stillroom.ReplayDataset(args.store, store_root=args.store_root)  # epoch 0's views and labels
    sampler: DistributedSampler | None = None  # DDP (examples/ddp_loop.py): each rank its own share
    if distributed:
        sampler = DistributedSampler(dataset, shuffle=True, seed=args.seed)
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=sampler is None, sampler=sampler,
                        num_workers=args.workers, collate_fn=stillroom.collate, drop_last=True,
                        pin_memory=device.type == "cuda")
    channels = dataset.dataset.channels
    model = timm.create_model(args.model, num_classes=dataset.num_classes, in_chans=channels, **args.model_kwargs)
    model.to(device)
    normalize = stillroom.input_config(model, channels).normalize  # the student's mean/std, as stillroom's
    optimizer = create_optimizer_v2(model, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay)
    scheduler, epochs = create_scheduler_v2(optimizer, sched="cosine", num_epochs=args.epochs,
                                            warmup_epochs=args.warmup_epochs, updates_per_epoch=len(loader))
    if distributed:
        model = torch.nn.parallel.DistributedDataParallel(model)

    seen: list[int] = []
    record: dict = {}
    for epoch in range(epochs):
        dataset.set_epoch(epoch)  # replay this epoch's stored views (seed epoch % S)
        if sampler is not None:
            sampler.set_epoch(epoch)
        model.train()
        for i, parts in enumerate(loader):  # uint8 views from the workers
            batch = stillroom.finish(parts, device)  # float views in [0, 1] on the device, with their labels
            loss = kd_loss(model(normalize(batch.views)), batch, args.temperature, args.alpha)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step_update(num_updates=epoch * len(loader) + i + 1)
            if epoch == 0:
                seen += batch.ids.tolist()
        scheduler.step(epoch + 1)
        record = {"epoch": epoch, "rank": rank, "loss": round(loss.item(), 4),
                  "lr": optimizer.param_groups[0]["lr"]}
        print(json.dumps(record), flush=True)
    if args.seen:
        with open(args.seen.format(rank=rank), "w") as f:
            json.dump(seen, f)
    if args.out and rank == 0:
        torch.save(getattr(model, "module", model).state_dict(), args.out)
    return record


if __name__ == "__main__":
    main()
