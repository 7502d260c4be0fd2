"""Where the time goes: a ``torch.profiler`` pass of the static DiT and the sliced DyDiT on the
benchmark's inputs, with each op's self time grouped into a few categories (matmuls, attention,
token gather/scatter, norms and elementwise, the rest), so the gap between the measured and the
ideal speed-up can be attributed; or, with ``kind="stages"``, the wall-clock time of each stage
of the forward (:mod:`.stages`); or, with ``kind="noise"``, whether this machine can read the
bench at all (:mod:`.noise`: a known ratio measured the bench's way).

``python -m dydit_lab bench --arch DiT-XL/2 --batch-size 8 --profile``
``python -m dydit_lab bench --checkpoint data/checkpoints/DyDiT-lab-L-0.5.pt --batch-size 100 --steps 50 --profile``
"""

from __future__ import annotations

import torch
from torch.profiler import ProfilerActivity, profile

from ..models.dit import DiT
from ..models.dydit import CompleteModel, DyDiT
from ..paths import resolve_device
from .checkpoint import own_run, trace_inputs
from .noise import describe_noise, duration_control
from .setup import prepare_bench
from .stages import describe_stages, stage_breakdown
from .workload import BenchInputs

# Category of an op by its name (first match wins); anything else is "other".
CATEGORIES = (
    ("attention", ("scaled_dot_product", "_flash_attention", "_efficient_attention", "softmax")),
    ("matmul", ("addmm", "aten::mm", "aten::bmm", "aten::linear", "aten::matmul", "baddbmm")),
    ("token gather/scatter", ("index_select", "index_add", "index_put", "gather", "scatter", "nonzero",
                              "masked_select", "aten::index", "unique", "argsort", "sort")),
    ("norm and elementwise", ("layer_norm", "aten::mul", "aten::add", "aten::gelu", "aten::silu",
                              "aten::sigmoid", "aten::sub", "aten::div", "aten::tanh", "aten::copy_",
                              "aten::cat", "aten::clone", "aten::contiguous")),
)


def category(op: str) -> str:
    """The category of a profiled op name (see ``CATEGORIES``)."""
    for name, keys in CATEGORIES:
        if any(key in op for key in keys):
            return name
    return "other"


@torch.no_grad()
def profile_pass(fn, inputs: BenchInputs, device: torch.device, top: int = 12) -> dict:
    """Profile one forward at every sampled timestep of ``inputs``: total self time (ms), the
    share per category, and the ``top`` ops by self time (name, calls, ms, share)."""
    for x, t in zip(inputs.x, inputs.t):  # warm-up: every step's widths sliced and cached, as in sampling
        fn(x, t, inputs.y)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for x, t in zip(inputs.x, inputs.t):
            fn(x, t, inputs.y)
        if device.type == "cuda":  # CUDA only: wait for the kernels inside the profile
            torch.cuda.synchronize(device)
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    shares: dict[str, float] = {}
    for event in events:
        name = category(event.key)
        shares[name] = shares.get(name, 0.0) + event.self_cpu_time_total / total
    ops = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return {"self_ms": total / 1e3,
            "categories": dict(sorted(shares.items(), key=lambda kv: -kv[1])),
            "top_ops": [{"op": e.key, "calls": e.count, "self_ms": e.self_cpu_time_total / 1e3,
                         "share": e.self_cpu_time_total / total} for e in ops]}


PROFILE_KINDS = ("ops", "stages", "noise")
DESCRIBE_TIMING = {"stages": describe_stages, "noise": describe_noise}  # the wall-clock kinds' text


def profile_paths(dit: DiT, dydit: DyDiT, inputs: BenchInputs, device: torch.device, top: int = 12,
                  kind: str = "ops", repeats: int = 3) -> dict:
    """Where the static DiT's and the sliced DyDiT's time goes (routers already set):
    ``kind="ops"``, :func:`profile_pass` of each (op self times by category); ``"stages"``,
    :func:`.stages.stage_breakdown` (wall-clock time of each stage, ``repeats`` passes);
    ``"noise"``, :func:`.noise.duration_control` of the static model (``repeats`` passes)."""
    if kind not in PROFILE_KINDS:
        raise ValueError(f"profile kind must be one of {PROFILE_KINDS}, got {kind!r}")
    if kind == "stages":
        return stage_breakdown(dit, dydit, inputs, device, repeats)
    if kind == "noise":
        return duration_control(dit, inputs, device, repeats)
    dit.eval(), dydit.eval()
    dydit.execution = "sliced"
    return {"kind": "ops", "static": profile_pass(dit, inputs, device, top),
            "sliced": profile_pass(lambda x, t, y: dydit(x, t, y), inputs, device, top)}


def run_profile(arch: str, input_size: int = 32, target_ratio: float = 0.5, batch_size: int = 8,
                steps: int = 2, device: str = "auto", seed: int = 0, threads: int | None = None,
                top: int = 12, kind: str = "ops", repeats: int = 3) -> dict:
    """Build the benchmark's models (routers set for ``target_ratio``) and profile both paths."""
    bench = prepare_bench(arch, input_size, target_ratio, batch_size, steps, resolve_device(device), seed,
                          threads=threads)
    result = profile_paths(bench.dit, bench.dydit, bench.inputs, bench.device, top, kind, repeats)
    return {"arch": arch, "batch_size": batch_size, "steps": steps, "target_ratio": target_ratio,
            "num_threads": torch.get_num_threads(), "device": str(bench.device), **result}


def profile_checkpoint(model: DyDiT, batch_size: int = 4, steps: int = 20, seed: int = 0, device="auto",
                       threads: int | None = None, top: int = 12, name: str | None = None,
                       kind: str = "ops", repeats: int = 3) -> dict:
    """Profile a trained DyDiT's sliced path against its complete model (every gate on) on the
    inputs of its own DDIM run (``steps`` steps, ``batch_size`` images, labels 0, 1, ...), the
    workload :func:`.checkpoint.checkpoint_speedup` times."""
    model, device, trace = own_run(model, batch_size, steps, seed, device, threads, purpose="a profile")
    result = profile_paths(CompleteModel(model), model, trace_inputs(trace, device), device, top, kind, repeats)
    return {"arch": name or model.arch or "DyDiT", "batch_size": batch_size, "steps": steps,
            "flops_fraction": trace.mean_flops_fraction, "num_threads": torch.get_num_threads(),
            "device": str(device), **result}


def describe_profile(result: dict) -> str:
    """A few readable lines: self time and category shares of each path, then its top ops."""
    setting = (f"target {result['target_ratio']}" if "target_ratio" in result
               else f"FLOPs fraction {result['flops_fraction']:.3f}")  # a checkpoint routes as trained
    lines = [f"{result['arch']}, batch {result['batch_size']}, {result['steps']} steps, "
             f"{setting}, {result['num_threads']} thread(s), {result['device']}"]
    if result["kind"] in DESCRIBE_TIMING:
        return "\n".join(lines + [DESCRIBE_TIMING[result["kind"]](result)])
    for path in ("static", "sliced"):
        part = result[path]
        shares = ", ".join(f"{name} {share:.0%}" for name, share in part["categories"].items())
        lines.append(f"{path}: {part['self_ms']:.0f} ms self time; {shares}")
        lines += [f"    {op['op']:<50} {op['calls']:>6} calls {op['self_ms']:>9.1f} ms {op['share']:>6.1%}"
                  for op in part["top_ops"]]
    return "\n".join(lines)
