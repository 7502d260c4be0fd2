"""Sample quality without Inception weights: a LeNet trained on our MNIST split.

``FD-LeNet`` is the Frechet distance between Gaussian fits of the classifier's penultimate
features (128-d) of generated and real digits; ``accuracy`` is the fraction of
class-conditional samples the classifier assigns to the requested class.

The metric is checked by a second judge: :class:`SampleEvaluator` also scores the same samples
with a LeNet trained with another seed (``data/lenet_mnist_seed1.pt``) as ``fd_lenet_alt`` and
``accuracy_alt``, so an ordering of two models can be tested under both classifiers
(:func:`dydit_lab.evaluation.results.fd_orderings`).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data import mnist_split
from ..paths import DEFAULT_CLASSIFIER, SECOND_CLASSIFIER, display_path
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
                     progress: bool = True, overwrite: bool = False) -> dict:
    """Train LeNet on the MNIST train split (random +-2 px shifts) and save it to ``out``.

    Deterministic per ``seed`` (weights, batch order and shifts) at a given thread count.
    The file holds ``state_dict``, ``val_accuracy`` (on the 500 held-out ``val`` digits),
    ``seed`` and ``epochs``; the same keys come back with ``seconds`` of training and ``out``.
    An existing ``out`` is an error unless ``overwrite``.
    """
    out = Path(out)
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive integer, got {epochs!r}")
    if out.is_dir():
        raise ValueError(f"classifier output {out} is a directory; give a file such as {out / 'lenet.pt'}")
    if out.exists() and not overwrite:
        raise FileExistsError(f"classifier {out} exists: pass --overwrite (overwrite=True) to replace it")
    start = time.perf_counter()
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
    record = {"val_accuracy": acc, "seed": seed, "epochs": epochs}
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": net.state_dict(), **record}, out)
    return {**record, "seconds": time.perf_counter() - start, "out": display_path(out)}


def load_classifier(path: str | Path = DEFAULT_CLASSIFIER, device="cpu") -> LeNet:
    """The LeNet saved at ``path`` (by :func:`train_classifier`), in eval mode.

    A missing file is a ``FileNotFoundError``, a file that holds no LeNet a ``ValueError``;
    both name the file in one line.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"no classifier at {path}: train it with `python -m dydit_lab train-classifier --out {path}`")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for a file it cannot read
        raise ValueError(f"{path} is not a classifier file: {type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''}") from err
    if not isinstance(saved, dict) or not isinstance(saved.get("state_dict"), dict):
        raise ValueError(f"{path} is not a classifier file: no 'state_dict' (train-classifier writes one)")
    net = LeNet()
    try:
        net.load_state_dict(saved["state_dict"])
    except RuntimeError as err:
        raise ValueError(f"{path} holds no LeNet: its weights do not fit (missing, unexpected "
                         f"or mis-shaped keys)") from err
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
    """Accuracy and FD-LeNet of class-conditional samples against the real MNIST train split.

    With a ``second`` classifier (another LeNet, e.g. trained with another seed), every score
    also carries the same metrics under it, suffixed ``_alt`` (``fd_lenet_alt``,
    ``accuracy_alt``, and their intervals), at the cost of one more LeNet pass over the
    samples: the images are generated once. ``classifier_file`` and ``second_file`` name the
    files when built by :meth:`from_files`.
    """

    def __init__(self, classifier: LeNet, device="cpu", second: LeNet | None = None):
        self.device = torch.device(device)
        self.classifier = classifier.to(self.device).eval()
        self.second = None if second is None else second.to(self.device).eval()
        self.classifier_file: str | None = None
        self.second_file: str | None = None
        real = mnist_split("train").tensors[0]
        self.reference = gaussian_stats(self.features(real))
        self.second_reference = None if second is None else gaussian_stats(self.features(real, self.second))

    @classmethod
    def from_files(cls, classifier: str | Path = DEFAULT_CLASSIFIER,
                   second: str | Path | None = SECOND_CLASSIFIER, device="cpu") -> "SampleEvaluator":
        """The judges saved at ``classifier`` and ``second`` (None: no second judge)."""
        evaluator = cls(load_classifier(classifier), device=device,
                        second=None if second is None else load_classifier(second))
        evaluator.classifier_file = display_path(classifier)
        evaluator.second_file = None if second is None else display_path(second)
        return evaluator

    @classmethod
    def from_default(cls, device="cpu", second: str | Path | None = SECOND_CLASSIFIER) -> "SampleEvaluator":
        """The committed judges: ``data/lenet_mnist.pt`` and, unless ``second`` is None, the
        seed-1 LeNet ``data/lenet_mnist_seed1.pt``."""
        return cls.from_files(DEFAULT_CLASSIFIER, second, device=device)

    @torch.no_grad()
    def features(self, images: torch.Tensor, classifier: LeNet | None = None) -> torch.Tensor:
        """Penultimate features of ``images`` under ``classifier`` (default: the main one)."""
        net = self.classifier if classifier is None else classifier
        return torch.cat([net.features(b.to(self.device)).cpu() for b in images.split(500)])

    @torch.no_grad()
    def score(self, images: torch.Tensor, labels: torch.Tensor, bootstrap: int = 0,
              seed: int = 0) -> dict[str, float]:
        """Metrics of given images (in [-1, 1]) that should show digits ``labels``.

        ``bootstrap`` > 0 adds 95 % percentile intervals over the generated samples
        (``accuracy_lo/hi``, ``fd_lenet_lo/hi``; see :func:`bootstrap_intervals`). With a second
        classifier, the same keys follow with ``_alt`` after the metric's name
        (``fd_lenet_alt``, ``fd_lenet_alt_lo``, ...); both use the same bootstrap resamples.
        """
        images = images.clamp(-1, 1)
        metrics = self._judge(self.classifier, self.reference, images, labels, bootstrap, seed)
        if self.second is not None:
            alt = self._judge(self.second, self.second_reference, images, labels, bootstrap, seed)
            metrics |= {alt_key(k): v for k, v in alt.items()}
        return metrics

    def _judge(self, net: LeNet, reference, images, labels, bootstrap: int, seed: int) -> dict[str, float]:
        preds = torch.cat([net(b.to(self.device)).argmax(1).cpu() for b in images.split(500)])
        correct = preds == labels.cpu()
        features = self.features(images, net)
        metrics = {"accuracy": correct.float().mean().item(),
                   "fd_lenet": frechet_distance(gaussian_stats(features), reference)}
        if bootstrap:
            metrics |= bootstrap_intervals(features, correct, reference, bootstrap, seed)
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
    """95 % bootstrap intervals of FD-LeNet and accuracy over the generated samples.

    The reference statistics stay fixed: the interval is the sampling noise of ``len(features)``
    generated images, not of the training run. Accuracy gets the percentile interval. FD's
    bootstrap distribution sits above the point estimate (a resample repeats images, which
    makes the fitted covariance noisier), by more than the spread for a good model, so its
    percentile interval can exclude the estimate itself; the FD interval is therefore the
    bootstrap spread around the estimate, ``fd + (quantile - median)`` (the shift is the
    bootstrap's own bias). Compare intervals of equally many samples only.
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
    quantiles = torch.tensor([tail, 0.5, 1 - tail], dtype=torch.float64)
    fd_lo, fd_median, fd_hi = torch.quantile(torch.tensor(fds, dtype=torch.float64), quantiles).tolist()
    fd = frechet_distance(gaussian_stats(features), reference)
    acc_lo, _, acc_hi = torch.quantile(torch.tensor(accuracies, dtype=torch.float64), quantiles).tolist()
    return {"fd_lenet_lo": fd + fd_lo - fd_median, "fd_lenet_hi": fd + fd_hi - fd_median,
            "accuracy_lo": acc_lo, "accuracy_hi": acc_hi}


def alt_key(key: str) -> str:
    """The second classifier's name of a metric key: ``fd_lenet_lo`` -> ``fd_lenet_alt_lo``."""
    for metric in ("fd_lenet", "accuracy"):
        if key == metric or key.startswith(metric + "_"):
            return metric + "_alt" + key[len(metric):]
    raise ValueError(f"not a metric key: {key!r}")
