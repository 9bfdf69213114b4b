"""The soft contrastive loss over all GPUs (or CPU processes) of a torchrun job.

    torchrun --nproc_per_node=2 examples/distributed_loss.py                  # CPU, gloo
    torchrun --nproc_per_node=8 examples/distributed_loss.py --mode ring      # 8 GPUs, nccl

Each rank encodes its own local batch; ``group=True`` makes the loss that of the global batch
(every rank's rows against every rank's columns), exactly as one process would compute it on
the concatenated batch. A toy encoder and a learnable temperature train under DDP for a few
steps; at the end rank 0 checks the loss and the gathered gradients against one process.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn

import fastcon


class Model(nn.Module):
    """A toy encoder and the loss head (learnable temperature), trained together under DDP."""

    def __init__(self, mode: str, group):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(32, 128), nn.GELU(), nn.Linear(128, 64))
        self.loss = fastcon.SoftContrastiveLoss(0.1, learnable_temperature=True, group=group, distributed=mode)

    def forward(self, x1, x2, labels):
        return self.loss(self.encoder(x1), self.encoder(x2), labels)


def local_batch(step: int, rank: int, n: int, device):
    """Two noisy views of random inputs with multi-hot labels; different on every rank."""
    gen = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(n, 32, generator=gen)
    x1 = x + 0.1 * torch.randn(n, 32, generator=gen)
    x2 = x + 0.1 * torch.randn(n, 32, generator=gen)
    labels = (torch.rand(n, 8, generator=gen) < 0.3).float()
    return x1.to(device), x2.to(device), labels.to(device)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["gather", "ring"], default="gather")
    parser.add_argument("--local-batch", type=int, default=256, help="rows per rank (equal on all ranks)")
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()

    # torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda") if cuda else torch.device("cpu")

    torch.manual_seed(0)  # the same initial weights on every rank
    model = Model(args.mode, fastcon.distributed.WORLD).to(device)
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.AdamW(ddp.parameters(), lr=1e-3)
    for step in range(args.steps):
        loss = ddp(*local_batch(step, rank, args.local_batch, device))
        opt.zero_grad()
        # every rank's loss is the global-batch loss and its gradients are this rank's share:
        # DDP averages over ranks, so scale by the world size to get the single-process gradient
        (loss * world).backward()
        opt.step()
        if rank == 0:
            print(f"step {step}: loss {loss.item():.4f} over {world} x {args.local_batch} samples ({args.mode})")

    # check: the same loss and gradients as one process on the concatenated batch
    x1, x2, labels = local_batch(args.steps, rank, args.local_batch, device)
    with torch.no_grad():
        z1, z2 = model.encoder(x1), model.encoder(x2)
    z1.requires_grad_(True)
    z2.requires_grad_(True)
    loss = model.loss(z1, z2, labels)
    loss.backward()
    every = []  # z1, z2, labels, dz1, dz2 of the global batch, in rank order
    for t in (z1, z2, labels, z1.grad, z2.grad):
        parts = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(parts, t.detach().contiguous())
        every.append(torch.cat(parts))
    if rank == 0:
        single = fastcon.SoftContrastiveLoss(0.1).to(device)
        single.log_scale.copy_(model.loss.log_scale.detach())
        a, b = every[0].clone().requires_grad_(True), every[1].clone().requires_grad_(True)
        ref = single(a, b, every[2])
        ref.backward()

        def rel(x, y):
            return ((x - y).abs().max() / y.abs().max()).item()

        print(
            "distributed vs one process on the global batch, relative differences: "
            f"loss {rel(loss, ref):.1e}, dz1 {rel(every[3], a.grad):.1e}, dz2 {rel(every[4], b.grad):.1e}"
        )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
