"""Train the default model (fmnist_cnn) on Fashion-MNIST and write its checkpoint and measured figures.

python -m pipeline.baseline [--epochs 3] [--out models/fmnist_cnn.pt]
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from pipeline.artifacts import write_text_atomic
from pipeline.data.fashion_mnist import load_fashion_mnist
from pipeline.models.checkpoint import save_checkpoint
from pipeline.models.zoo import get_model_spec
from pipeline.train.distill import accuracy, predict

REPO = Path(__file__).resolve().parent.parent


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random shift (pad 2 + crop) and horizontal flip, per batch."""
    _, _, h, w = x.shape
    dy, dx, flip = torch.randint(0, 5, (3,), generator=gen).tolist()
    x = F.pad(x, (2, 2, 2, 2), mode="replicate")[:, :, dy : dy + h, dx : dx + w]
    return x.flip(3) if flip % 2 else x


def train(epochs: int, *, seed: int, batch_size: int, lr: float) -> tuple[torch.nn.Module, dict]:
    torch.manual_seed(seed)
    spec = get_model_spec("fmnist_cnn")
    train_set, test_set = load_fashion_mnist("train"), load_fashion_mnist("test")
    model = spec.build().train()
    steps = epochs * (len(train_set) // batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.2)
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    bar = tqdm(total=steps, desc="train fmnist_cnn", unit="step", disable=None)
    for _ in range(epochs):
        order = torch.randperm(len(train_set), generator=gen).numpy()
        for i in range(0, len(order) - batch_size + 1, batch_size):
            idx = order[i : i + batch_size]
            x = _augment(spec.to_tensor(train_set.images[idx]), gen)
            loss = F.cross_entropy(model(x), torch.from_numpy(train_set.labels[idx]), label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss):.3f}")
    bar.close()
    seconds = time.perf_counter() - start
    model.eval()
    acc = accuracy(predict(model, spec, test_set), test_set.labels)
    figures = {
        "model": "fmnist_cnn",
        "test_accuracy": round(float(acc), 4),
        "test_images": len(test_set),
        "epochs": epochs,
        "train_images": len(train_set),
        "seed": seed,
        "batch_size": batch_size,
        "lr": lr,
        "train_seconds": round(seconds, 1),
        "torch": str(torch.__version__),
        "threads": torch.get_num_threads(),
    }
    return model, figures


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--out", type=Path, default=REPO / "models" / "fmnist_cnn.pt")
    args = ap.parse_args(argv)
    model, figures = train(args.epochs, seed=args.seed, batch_size=args.batch_size, lr=args.lr)
    figures["trained_with"] = "python -m pipeline.baseline " + shlex.join(
        ["--epochs", str(args.epochs), "--seed", str(args.seed)]
    )
    save_checkpoint(model, args.out, meta=figures)
    write_text_atomic(args.out.with_suffix(".json"), json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    np.seterr(all="ignore")
    sys.exit(main())
