"""Sample quality without Inception weights: a LeNet trained on our MNIST split.

``FD-LeNet`` is the Frechet distance between Gaussian fits of the classifier's penultimate
features (128-d) of generated and real digits; ``accuracy`` is the fraction of
class-conditional samples the classifier assigns to the requested class.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data import mnist_split
from ..paths import DEFAULT_CLASSIFIER
from .sampling import generate


class LeNet(nn.Module):
    """LeNet-5-style classifier for 32x32 one-channel digits."""

    def __init__(self, num_classes: int = 10, feature_dim: int = 128):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 5)
        self.conv2 = nn.Conv2d(32, 64, 5)
        self.fc1 = nn.Linear(64 * 5 * 5, feature_dim)
        self.fc2 = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations, the space FD-LeNet is measured in."""
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return F.relu(self.fc1(x.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.features(x))


def train_classifier(out: str | Path = DEFAULT_CLASSIFIER, epochs: int = 15, seed: int = 0,
                     progress: bool = True) -> dict[str, float]:
    """Train LeNet on the MNIST train split (random +-2 px shifts), save it, return val accuracy."""
    torch.manual_seed(seed)
    train, val = mnist_split("train"), mnist_split("val")
    x, y = train.tensors
    net = LeNet()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    gen = torch.Generator().manual_seed(seed)
    for _ in tqdm(range(epochs), desc="train LeNet", disable=not progress):
        net.train()
        for idx in torch.randperm(len(x), generator=gen).split(128):
            dx, dy = torch.randint(-2, 3, (2,), generator=gen).tolist()
            batch = torch.roll(x[idx], shifts=(dx, dy), dims=(2, 3))
            loss = F.cross_entropy(net(batch), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    net.eval()
    with torch.no_grad():
        acc = (net(val.tensors[0]).argmax(1) == val.tensors[1]).float().mean().item()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": net.state_dict(), "val_accuracy": acc}, out)
    return {"val_accuracy": acc}


def load_classifier(path: str | Path = DEFAULT_CLASSIFIER, device="cpu") -> LeNet:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"no classifier at {path}: train it with `python -m dydit_lab train-classifier`")
    net = LeNet()
    net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True)["state_dict"])
    return net.to(device).eval()


def gaussian_stats(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    f = features.double()
    return f.mean(0), torch.cov(f.T)


def frechet_distance(stats_a, stats_b) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^1/2), via a symmetric eigen-problem."""
    (mu_a, cov_a), (mu_b, cov_b) = stats_a, stats_b
    evals, evecs = torch.linalg.eigh(cov_a)
    sqrt_a = evecs @ torch.diag(evals.clamp(min=0).sqrt()) @ evecs.T
    middle = torch.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a).clamp(min=0).sqrt().sum()
    return float(((mu_a - mu_b) ** 2).sum() + torch.trace(cov_a) + torch.trace(cov_b) - 2 * middle)


class SampleEvaluator:
    """Accuracy and FD-LeNet of class-conditional samples against the real MNIST train split."""

    def __init__(self, classifier: LeNet, device="cpu"):
        self.device = torch.device(device)
        self.classifier = classifier.to(self.device).eval()
        self.reference = gaussian_stats(self.features(mnist_split("train").tensors[0]))

    @classmethod
    def from_default(cls, device="cpu") -> "SampleEvaluator":
        return cls(load_classifier(DEFAULT_CLASSIFIER), device=device)

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.classifier.features(b.to(self.device)).cpu() for b in images.split(500)])

    @torch.no_grad()
    def score(self, images: torch.Tensor, labels: torch.Tensor, bootstrap: int = 0,
              seed: int = 0) -> dict[str, float]:
        """Metrics of given images (in [-1, 1]) that should show digits ``labels``.

        ``bootstrap`` > 0 adds 95 % percentile intervals over the generated samples
        (``accuracy_lo/hi``, ``fd_lenet_lo/hi``; see :func:`bootstrap_intervals`).
        """
        images = images.clamp(-1, 1)
        preds = torch.cat([self.classifier(b.to(self.device)).argmax(1).cpu() for b in images.split(500)])
        correct = preds == labels.cpu()
        features = self.features(images)
        metrics = {"accuracy": correct.float().mean().item(),
                   "fd_lenet": frechet_distance(gaussian_stats(features), self.reference)}
        if bootstrap:
            metrics |= bootstrap_intervals(features, correct, self.reference, bootstrap, seed)
        return metrics

    @torch.no_grad()
    def evaluate(self, model, num_samples: int = 1000, steps: int = 50, method: str = "ddim",
                 cfg_scale: float = 1.0, seed: int = 0, batch_size: int = 250,
                 progress: bool = True, bootstrap: int = 0) -> dict[str, float]:
        """Sample ``num_samples`` digits (balanced classes) with ``steps`` steps and score them."""
        samples, labels = generate(model, num_samples, steps=steps, method=method, cfg_scale=cfg_scale,
                                   seed=seed, batch_size=batch_size, device=self.device,
                                   progress=progress)
        return self.score(samples, labels, bootstrap=bootstrap, seed=seed)


def bootstrap_intervals(features: torch.Tensor, correct: torch.Tensor, reference, rounds: int = 500,
                        seed: int = 0, level: float = 0.95) -> dict[str, float]:
    """Percentile bootstrap intervals of FD-LeNet and accuracy over the generated samples.

    The reference statistics stay fixed: the interval is the sampling noise of ``len(features)``
    generated images, not of the training run. FD's bootstrap distribution lies above the
    point estimate (repeated samples make the fitted covariance noisier), so the interval is
    wide on the high side; compare intervals of equally many samples only.
    """
    if rounds < 2:
        raise ValueError(f"bootstrap needs at least 2 rounds, got {rounds}")
    gen = torch.Generator().manual_seed(seed)
    n = len(features)
    fds, accuracies = [], []
    for _ in range(rounds):
        idx = torch.randint(n, (n,), generator=gen)
        fds.append(frechet_distance(gaussian_stats(features[idx]), reference))
        accuracies.append(correct[idx].float().mean().item())
    tail = (1 - level) / 2
    quantiles = torch.tensor([tail, 1 - tail], dtype=torch.float64)
    fd_lo, fd_hi = torch.quantile(torch.tensor(fds, dtype=torch.float64), quantiles).tolist()
    acc_lo, acc_hi = torch.quantile(torch.tensor(accuracies, dtype=torch.float64), quantiles).tolist()
    return {"fd_lenet_lo": fd_lo, "fd_lenet_hi": fd_hi, "accuracy_lo": acc_lo, "accuracy_hi": acc_hi}
