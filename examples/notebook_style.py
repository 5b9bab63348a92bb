"""What a notebook does with edgeship: train a model in memory, then deploy that very module for a target.

    PYTHONPATH=. .venv/bin/python examples/notebook_style.py      # ~2 minutes on 2 cores; writes runs/, artifacts/

The model is defined here (nothing to import as `package.module:factory`, no checkpoint file): edgeship
hashes its structure and weights, so running the deploy cell again skips every stage that is still fresh.
"""

import torch
from torch import nn

import pipeline
from pipeline.data.fashion_mnist import CLASS_NAMES, load_fashion_mnist

MEAN, STD = 0.2860, 0.3530


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        )  # fmt: skip
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(32 * 7 * 7, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def as_dataset(split: str, n: int) -> torch.utils.data.TensorDataset:
    """n Fashion-MNIST images as (CHW float 0-1 image, label) pairs: what a notebook's Dataset yields."""
    data = load_fashion_mnist(split).subset(n, seed=0)
    images = torch.from_numpy(data.images).permute(0, 3, 1, 2).float() / 255
    return torch.utils.data.TensorDataset(images, torch.from_numpy(data.labels))


# --- cell 1: data and one epoch of training (the model sees normalized pixels, as edgeship will feed it)
torch.manual_seed(0)
train, test = as_dataset("train", 4000), as_dataset("test", 1000)
model = SmallCNN()
opt = torch.optim.Adam(model.parameters(), lr=2e-3)
model.train()
for images, labels in torch.utils.data.DataLoader(train, batch_size=64, shuffle=True):
    loss = nn.functional.cross_entropy(model((images - MEAN) / STD), labels)
    opt.zero_grad()
    loss.backward()
    opt.step()
model.eval()

# --- cell 2: deploy the module as it is, for this machine, with small settings
result = pipeline.deploy(
    model,
    "host",
    data={"train": train, "test": test},  # no "val": 10% of each class is carved from train
    input_shape=(1, 28, 28),
    mean=MEAN,
    std=STD,
    classes=CLASS_NAMES,
    overrides={"finetune.epochs": 0.2, "profiling.runs": 20, "profiling.min_seconds": 0.5},
    progress=True,  # the CLI's progress lines on stderr; a callable gets (stage, record) instead
    allow_budget_miss=True,  # a one-epoch model may miss host.yaml's accuracy budget; publish and show it
)

# --- cell 3: the figures
print(result.table())
print(f"MACs {result.macs[0]:,} -> {result.macs[1]:,}; latency measured on {result.measured_on}")
print(f"bundle: {result.bundle}  report: {result.report_html}")
