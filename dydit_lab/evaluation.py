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

from .data import mnist_split
from .diffusion import GaussianDiffusion

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
DEFAULT_CLASSIFIER = DATA_DIR / "lenet_mnist.pt"


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
    def score(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        """Metrics of given images (in [-1, 1]) that should show digits ``labels``."""
        images = images.clamp(-1, 1)
        preds = torch.cat([self.classifier(b.to(self.device)).argmax(1).cpu() for b in images.split(500)])
        return {"accuracy": (preds == labels.cpu()).float().mean().item(),
                "fd_lenet": frechet_distance(gaussian_stats(self.features(images)), self.reference)}

    @torch.no_grad()
    def evaluate(self, model, num_samples: int = 1000, steps: int = 50, method: str = "ddim",
                 cfg_scale: float = 1.0, seed: int = 0, batch_size: int = 250,
                 progress: bool = True) -> dict[str, float]:
        """Sample ``num_samples`` digits (balanced classes) with ``steps`` steps and score them."""
        samples, labels = generate(model, num_samples, steps=steps, method=method, cfg_scale=cfg_scale,
                                   seed=seed, batch_size=batch_size, device=self.device,
                                   progress=progress)
        return self.score(samples, labels)


@torch.no_grad()
def generate(model, num_samples: int, steps: int = 50, method: str = "ddim", cfg_scale: float = 1.0,
             seed: int = 0, batch_size: int = 250, device="cpu", progress: bool = True):
    """Balanced class-conditional samples (label i % num_classes) and their labels, on CPU."""
    was_training = model.training
    model.eval()
    diffusion = GaussianDiffusion(learn_sigma=model.config.learn_sigma).respaced(steps)
    labels = torch.arange(num_samples) % model.num_classes
    size, channels = model.config.input_size, model.in_channels
    out = []
    for i, y in enumerate(tqdm(labels.split(batch_size), desc="sampling", disable=not progress)):
        out.append(diffusion.sample(model, y.to(device), (len(y), channels, size, size), method=method,
                                    cfg_scale=cfg_scale, seed=seed + i, progress=False).cpu())
    model.train(was_training)
    return torch.cat(out), labels


# ---------------------------------------------------------------------------
# One checkpoint, one sampling setting: quality, compute and wall-clock together
# ---------------------------------------------------------------------------


def sampling_cost(model, steps: int, method: str = "ddim", device="cpu") -> dict:
    """What one sampling step of ``model`` costs per image, as it will be sampled.

    ``gflops_per_step`` (mean over the run) and ``flops_fraction`` of the static parent. A
    static DiT: the analytic count. A DyDiT: the routing it actually uses over a sampling run,
    plus ``block_flops_fraction`` (attention + MLP only, what its fine-tuning constrains to
    lambda). A FlexiDiT behind a :class:`~dydit_lab.flexidit.PatchSchedule`: the exact mix of
    coarse and native steps.
    """
    from .dydit import DyDiT
    from .flexidit import PatchSchedule, schedule_flops
    from .flops import analytic_flops, sampling_flops

    if isinstance(model, PatchSchedule):
        run = schedule_flops(model.model.config, model.coarse_patch, model.coarse_steps, model.total_steps)
        return {"gflops_per_step": run["gflops_per_image_step"], "flops_fraction": run["flops_fraction"]}
    if isinstance(model, DyDiT):
        run = sampling_flops(model, steps=steps, method=method, device=device, progress=False)
        return {k: run[k] for k in ("flops_fraction", "block_flops_fraction")} | {
            "gflops_per_step": run["gflops_per_image_step"]}
    if isinstance(model, CompleteModel) and model.from_t > 0:
        # Steps at t >= from_t cost the static model; the routed ones as in a fully routed run
        # (TDW exact, since it depends on t only; SDT keep-rates from that run).
        run = sampling_flops(model.model, steps=steps, method=method, device=device, progress=False)
        fractions = [1.0 if t >= model.from_t else f
                     for t, f in zip(run["per_step_timesteps"], run["per_step_fraction"])]
        fraction = sum(fractions) / len(fractions)
        return {"flops_fraction": fraction, "gflops_per_step": fraction * run["static_gflops"]}
    return {"gflops_per_step": analytic_flops(model.config)["total"] / 1e9, "flops_fraction": 1.0}


class CompleteModel(torch.nn.Module):
    """A DyDiT with every head, group and token on (its routers bypassed): the control that
    separates what fine-tuning did to the weights from what the routing costs.

    ``from_t`` > 0 bypasses the routers only at timesteps t >= from_t and routes below: it
    shows which noise levels the routing's quality cost comes from.
    """

    def __init__(self, model, from_t: int = 0):
        super().__init__()
        if not 0 <= from_t < 1000:
            raise ValueError(f"from_t must be in [0, 1000), got {from_t}")
        self.model, self.from_t = model, from_t
        self.config, self.num_classes, self.in_channels = model.config, model.num_classes, model.in_channels

    def forward(self, x, t, y):
        complete = t >= self.from_t
        if complete.all() or not complete.any():
            return self.model(x, t, y, complete_model=bool(complete.all()))
        full = self.model(x[complete], t[complete], y[complete], complete_model=True)
        routed = self.model(x[~complete], t[~complete], y[~complete])
        out = full.new_empty((len(x), *full.shape[1:]))
        out[complete], out[~complete] = full, routed
        return out


def sampling_model(checkpoint: str | Path, steps: int = 50, coarse_steps: int | None = None,
                   complete_model: bool = False, device="cpu", saved: dict | None = None,
                   complete_from_t: int = 0):
    """The model to sample a checkpoint with: as loaded, or a FlexiDiT whose first
    ``coarse_steps`` of ``steps`` run coarse, or a DyDiT with every gate on (at t >=
    ``complete_from_t``, see :class:`CompleteModel`).

    ``saved``: the checkpoint already read from ``checkpoint``, so it is not read twice.
    """
    from .checkpoints import load_model
    from .dydit import DyDiT
    from .flexidit import FlexiDiT, scheduled_model

    model = load_model(checkpoint if saved is None else saved, device=device)
    if coarse_steps is not None:
        if not isinstance(model, FlexiDiT):
            raise ValueError(f"--coarse-steps needs a FlexiDiT checkpoint; {checkpoint} holds a "
                             f"{type(model).__name__}")
        model = scheduled_model(model, coarse_steps, steps)
    if complete_model:
        if not isinstance(model, DyDiT):
            raise ValueError(f"--complete-model needs a DyDiT checkpoint; {checkpoint} holds a "
                             f"{type(model).__name__}")
        model = CompleteModel(model, complete_from_t)
    elif complete_from_t:
        raise ValueError("--complete-from-t needs --complete-model")
    return model


def timed_generate(model, num_samples: int, steps: int = 50, device="cpu", **options):
    """:func:`generate`, plus its wall-clock seconds per image (CUDA work waited for)."""
    import time

    start = time.perf_counter()
    samples, labels = generate(model, num_samples, steps=steps, device=device, **options)
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    return samples, labels, (time.perf_counter() - start) / num_samples


def evaluate_checkpoint(checkpoint: str | Path, num_samples: int = 1000, steps: int = 50,
                        method: str = "ddim", cfg_scale: float = 1.0, seed: int = 0,
                        coarse_steps: int | None = None, complete_model: bool = False,
                        evaluator: SampleEvaluator | None = None, device="cpu", progress: bool = True,
                        complete_from_t: int = 0) -> dict:
    """Sample from a checkpoint (DiT, DyDiT or FlexiDiT) and measure what it costs.

    Returns the quality metrics (``accuracy``, ``fd_lenet``), the compute
    (:func:`sampling_cost`, and ``gflops_per_image`` = per step x steps) and the measured sampling
    wall-clock ``seconds_per_image`` (generation only, at the evaluator's batch size, with the
    current torch thread count in ``threads``). ``coarse_steps``, ``complete_model`` and
    ``complete_from_t``: see :func:`sampling_model`.
    """
    from .checkpoints import read_checkpoint

    device = torch.device(device)
    evaluator = evaluator or SampleEvaluator.from_default(device=device)
    saved = read_checkpoint(checkpoint)
    model = sampling_model(checkpoint, steps, coarse_steps, complete_model, device, saved=saved,
                           complete_from_t=complete_from_t)
    samples, labels, seconds = timed_generate(model, num_samples, steps=steps, method=method,
                                              cfg_scale=cfg_scale, seed=seed, device=device, progress=progress)
    cost = sampling_cost(model, steps, method, device)
    recorded = saved.get("args") if isinstance(saved.get("args"), dict) else {}
    return {
        "checkpoint": str(checkpoint), "train_steps": saved.get("step", recorded.get("step")),
        "steps": steps, "method": method, "cfg_scale": cfg_scale, "num_samples": num_samples,
        "coarse_steps": coarse_steps, **cost,
        # classifier-free guidance runs the conditional and unconditional halves each step
        "gflops_per_image": cost["gflops_per_step"] * steps * (1 if cfg_scale == 1 else 2),
        "seconds_per_image": seconds, "device": device.type,
        "threads": torch.get_num_threads(), **evaluator.score(samples, labels),
    }
