"""Deterministic training for the zoo: one thread, a fixed optimizer, seeded batches.

The zoo's bytes must be the same on every machine for a seed, so training runs
single-threaded with hand-written update rules and its own batch generator.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F

from tiesfed.demo.model import DigitsMLP


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Train on one thread: bit-identical results whatever the machine's core count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class Optimizer:
    """Plain Adam / SGD-with-momentum on a list of tensors.

    Hand-written (the textbook update rules, as torch.optim's defaults) so the
    zoo build does not pay torch.optim's multi-second first-use import of
    torch._dynamo, and so the arithmetic is fixed by this file alone.
    """

    def __init__(self, params: list, kind: str, lr: float, momentum: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.params, self.kind, self.lr, self.momentum, self.betas, self.eps = params, kind, lr, momentum, betas, eps
        self.buf = [torch.zeros_like(p) for p in params]
        self.sq = [torch.zeros_like(p) for p in params] if kind == "adam" else []
        self.t = 0

    @torch.no_grad()
    def step(self) -> None:
        self.t += 1
        for i, p in enumerate(self.params):
            g = p.grad
            if self.kind == "sgd":
                buf = self.buf[i]
                if self.t == 1:
                    buf.copy_(g)
                else:
                    buf.mul_(self.momentum).add_(g)
                p.add_(buf, alpha=-self.lr)
            else:
                b1, b2 = self.betas
                m, v = self.buf[i], self.sq[i]
                m.mul_(b1).add_(g, alpha=1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                denom = (v / (1 - b2 ** self.t)).sqrt_().add_(self.eps)
                p.addcdiv_(m, denom, value=-self.lr / (1 - b1 ** self.t))
            p.grad = None


def train(
    model: DigitsMLP,
    x: torch.Tensor,
    y: torch.Tensor,
    steps: int,
    optimizer: Optimizer,
    batch_size: int,
    seed: int,
) -> None:
    """`steps` cross-entropy steps on batches drawn (with replacement) by a generator seeded with `seed`."""
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(y), (batch_size,), generator=gen)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        optimizer.step()
    model.eval()
