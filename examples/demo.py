"""Interim main job of `make demo`: show the backends and run the soft contrastive loss once on each.

(Replaced by the SoftCon / SwiMDiff pretraining demo once examples/pretrain.py lands.)
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # run the Triton kernels on the CPU

import fastcon


def main():
    print("fastcon backends:")
    print(fastcon.backends())
    torch.manual_seed(0)
    n, d, c = 256, 128, 9
    device = "cuda" if torch.cuda.is_available() else "cpu"
    z1 = torch.randn(n, d, device=device, requires_grad=True)
    z2 = torch.randn(n, d, device=device, requires_grad=True)
    labels = (torch.rand(n, c, device=device) < 0.3).float()
    print(f"\nsoft_contrastive_loss, N={n}, D={d}, C={c} multi-hot labels, on {device}:")
    for info in fastcon.backends():
        if not info.available:
            print(f"  {info.name:9s} skipped: {info.status}")
            continue
        try:
            loss = fastcon.soft_contrastive_loss(z1, z2, labels, backend=info.name)
            loss.backward()
            print(f"  {info.name:9s} loss {loss.item():.6f}  |grad z1| {z1.grad.norm().item():.6f}")
            z1.grad = z2.grad = None
        except (fastcon.BackendError, NotImplementedError, RuntimeError) as e:
            print(f"  {info.name:9s} not runnable yet: {str(e).splitlines()[0]}")


if __name__ == "__main__":
    main()
