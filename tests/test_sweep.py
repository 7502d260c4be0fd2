"""`python -m dydit_lab sweep`: a tiny grid end to end, skipping what is done, resuming what
was interrupted, one results row per run with intervals."""

import textwrap

import pytest
import torch

from dydit_lab import create_model
from dydit_lab.checkpoints import atomic_save
from dydit_lab.cli import main
from dydit_lab.evaluation.results import read_results
from dydit_lab.sweep import parse_only, plan_runs, read_spec, run_spec
from dydit_lab.training.dydit import FinetuneConfig, finetune
from tests.helpers import cli_error


@pytest.fixture(scope="module")
def tiny_parent(tmp_path_factory):
    path = tmp_path_factory.mktemp("parent") / "DiT-lab-T.pt"
    torch.manual_seed(0)
    atomic_save({"ema": create_model("DiT-lab-T").state_dict(), "args": {"arch": "DiT-lab-T"}}, path)
    return path


def write_spec(tmp_path, parent, steps=3, extra=""):
    spec = tmp_path / "spec.toml"
    spec.write_text(textwrap.dedent(f"""
        name = "tiny"
        command = "finetune"
        out = "{tmp_path / 'runs'}"
        results = "{tmp_path / 'results.csv'}"
        [config]
        parent = "{parent}"
        steps = {steps}
        batch_size = 8
        hold_steps = 0
        anneal_steps = 1
        noise_off_step = 0
        device = "cpu"
        [grid]
        target_ratio = [0.5, 0.9]
        [evaluate]
        num_samples = 20
        steps = 2
        bootstrap = 20
        {extra}
    """))
    return spec


def test_sweep_trains_evaluates_and_skips_what_is_done(tmp_path, tiny_parent, capsys):
    spec = write_spec(tmp_path, tiny_parent)
    main(["sweep", "--spec", str(spec), "--device", "cpu"])
    rows = {r["name"]: r for r in read_results(tmp_path / "results.csv")}
    assert set(rows) == {"tiny: target_ratio=0.5", "tiny: target_ratio=0.9"}
    for row in rows.values():
        assert row["sweep"] == "tiny" and row["train_steps"] == "3" and row["seed"] == "0"
        assert float(row["fd_lenet_lo"]) <= float(row["fd_lenet_hi"])
        assert 0 <= float(row["accuracy_lo"]) <= float(row["accuracy_hi"]) <= 1
        assert row["target_ratio"] in ("0.5", "0.9")
        assert float(row["lr"]) == FinetuneConfig.__dataclass_fields__["lr"].default  # [config]'s, not in the grid
    capsys.readouterr()
    main(["sweep", "--spec", str(spec), "--device", "cpu"])  # nothing new
    out = capsys.readouterr().out
    assert "0 new result row(s)" in out and out.count(": done") == 2
    assert len(read_results(tmp_path / "results.csv")) == 2


def test_sweep_resumes_an_interrupted_run(tmp_path, tiny_parent):
    spec = read_spec(write_spec(tmp_path, tiny_parent, steps=4, extra="sampling_seeds = [0, 1]"))
    first = plan_runs(spec)[0]
    finetune(FinetuneConfig(**{**first.config.__dict__, "steps": 2, "resume": False}))  # "interrupted" at 2
    log = []
    rows = run_spec(spec, device="cpu", log=log.append)
    assert "tiny: target_ratio=0.5: resume at 2" in log and "tiny: target_ratio=0.9: train" in log
    assert {r["train_steps"] for r in rows} == {4}
    assert sorted(r["name"] for r in rows) == sorted(
        f"tiny: target_ratio={lam}, sampling seed {s}" for lam in (0.5, 0.9) for s in (0, 1))


def test_a_grid_seed_is_the_training_seed_and_keeps_the_sampling_seed(tmp_path, tiny_parent):
    spec = read_spec(write_spec(tmp_path, tiny_parent, steps=2, extra="sampling_seeds = [0, 1]"))
    spec.grid = {"target_ratio": [0.5], "seed": [3]}
    rows = run_spec(spec, device="cpu", log=lambda *_: None)
    assert sorted((r["seed"], r["train_seed"]) for r in rows) == [(0, 3), (1, 3)]


def test_bad_specs_name_the_problem(tmp_path, tiny_parent):
    spec = write_spec(tmp_path, tiny_parent)
    spec.write_text(spec.read_text().replace("[grid]", "[grid]\nnot_a_flag = [1]"))
    with pytest.raises(ValueError, match="not_a_flag"):
        read_spec(spec)
    with pytest.raises(FileNotFoundError, match="no sweep spec"):
        read_spec(tmp_path / "missing.toml")
    (tmp_path / "bad.toml").write_text('name = "x"\ncommand = "dance"\nout = "o"\n')
    with pytest.raises(ValueError, match="command must be one of"):
        read_spec(tmp_path / "bad.toml")


def test_dry_run_changes_nothing(tmp_path, tiny_parent, capsys):
    main(["sweep", "--spec", str(write_spec(tmp_path, tiny_parent)), "--dry-run"])
    assert capsys.readouterr().out.count(": train") == 2
    assert not (tmp_path / "runs").exists() and not (tmp_path / "results.csv").exists()


def test_only_restricts_the_grid_and_names_a_bad_key(tmp_path, tiny_parent, capsys):
    main(["sweep", "--spec", str(write_spec(tmp_path, tiny_parent)), "--dry-run", "--only", "target_ratio=0.9"])
    out = capsys.readouterr().out
    assert "target_ratio=0.9: train" in out and "target_ratio=0.5" not in out
    err = cli_error(capsys, ["sweep", "--spec", str(write_spec(tmp_path, tiny_parent)), "--only", "seed=0"])
    assert "seed=0" in err and "target_ratio" in err


def test_only_matches_a_number_however_written_and_names_a_value_not_in_the_grid(tmp_path, tiny_parent):
    spec = read_spec(write_spec(tmp_path, tiny_parent))
    spec.grid = {"lr": [3e-5, 3e-4], "seed": [0, 1]}
    assert parse_only(["lr=3e-4", "seed=1"], spec) == {"lr": 0.0003, "seed": 1}
    assert [r.name for r in plan_runs(spec, parse_only(["lr=0.0003", "seed=1"], spec))] == ["tiny: lr=0.0003, seed=1"]
    with pytest.raises(ValueError, match=r"lr takes \[3e-05, 0.0003\]"):
        parse_only(["lr=1e-4"], spec)
    with pytest.raises(ValueError, match="seed takes"):
        parse_only(["seed=zero"], spec)


COMMITTED_SPECS = {"lambda": 21, "lambda-lr1e-4": 2, "recipe-0.5": 5, "recipe-baseline": 5, "recipe-distill": 5, "recipe-relative": 5,
                   "recipe-relative-distill": 5, "controls": 3, "controls-3e-4": 3, "controls-1200": 3, "controls-lr": 2, "recipe-lr": 4, "recipe-steps": 3, "flexidit": 3, "flexidit-frozen": 1, "flexidit-shared-lr": 6, "flexidit-lora": 9, "ablations": 6, "parents-S": 2, "parents-L": 2}


def test_every_committed_spec_is_checked():
    from dydit_lab.paths import DATA_DIR

    assert sorted(p.stem for p in (DATA_DIR / "sweeps").glob("*.toml")) == sorted(COMMITTED_SPECS)


@pytest.mark.parametrize("name", list(COMMITTED_SPECS))
def test_committed_specs_are_valid(name):
    from dydit_lab.paths import DATA_DIR

    runs = plan_runs(read_spec(DATA_DIR / "sweeps" / f"{name}.toml"))
    assert len(runs) == COMMITTED_SPECS[name]
    assert len({r.folder for r in runs}) == len(runs) and len({r.name for r in runs}) == len(runs)


def test_logs_are_kept_for_committing(tmp_path, tiny_parent):
    spec = write_spec(tmp_path, tiny_parent, steps=2)
    text = spec.read_text().replace('results = ', f'logs = "{tmp_path / "logs"}"\nresults = ')
    spec.write_text(text.replace("batch_size = 8", "routing_log_every = 1\nbatch_size = 8")
                    .replace("target_ratio = [0.5, 0.9]", "target_ratio = [0.5]"))
    run_spec(read_spec(spec), device="cpu", log=lambda line: None)
    kept = tmp_path / "logs" / "target_ratio0.5" / "routing.csv"
    assert kept.read_text() == (tmp_path / "runs" / "target_ratio0.5" / "routing.csv").read_text()
    kept.unlink()
    run_spec(read_spec(spec), device="cpu", log=lambda line: None)  # done: logs copied again, nothing retrained
    assert kept.exists()


def test_the_recipe_spec_shares_the_lambda_sweeps_runs():
    from dydit_lab.paths import DATA_DIR

    lam = {r.name: r for r in plan_runs(read_spec(DATA_DIR / "sweeps" / "lambda.toml"))}
    recipe = plan_runs(read_spec(DATA_DIR / "sweeps" / "recipe-0.5.toml"))
    shared = [r for r in recipe if r.name in lam]
    assert [r.values["seed"] for r in shared] == [0, 1, 2]
    for run in shared:  # same folder and config, so a run trained by either spec is done for both
        assert run.folder == lam[run.name].folder
        assert run.config == lam[run.name].config


def test_both_weights_get_their_own_rows(tmp_path, tiny_parent):
    spec = write_spec(tmp_path, tiny_parent, steps=2)
    spec.write_text(spec.read_text().replace('results = ', 'weights = ["model", "ema"]\nresults = ')
                    .replace("target_ratio = [0.5, 0.9]", "target_ratio = [0.5]"))
    rows = run_spec(read_spec(spec), device="cpu", log=lambda line: None)
    assert sorted(r["name"] for r in rows) == ["tiny: target_ratio=0.5, EMA weights",
                                               "tiny: target_ratio=0.5, online weights"]
    assert {r["weights"] for r in rows} == {"model", "ema"}
    assert (tmp_path / "runs" / "target_ratio0.5" / "ema.pt").exists()


def test_rows_carry_the_target_ratio_when_the_grid_does_not_vary_it(tmp_path, tiny_parent):
    spec = write_spec(tmp_path, tiny_parent, steps=1)
    spec.write_text(spec.read_text().replace("target_ratio = [0.5, 0.9]", "seed = [3]")
                    .replace("batch_size = 8", "batch_size = 8\ntarget_ratio = 0.7"))
    rows = run_spec(read_spec(spec), device="cpu", log=lambda line: None)
    assert [(r["name"], r["target_ratio"], r["train_seed"]) for r in rows] == [("tiny: seed=3", 0.7, 3)]


def test_a_flexidit_sweep_writes_one_row_per_number_of_coarse_steps(tmp_path, tiny_parent):
    spec = tmp_path / "flexi.toml"
    spec.write_text(textwrap.dedent(f"""
        name = "flexi"
        command = "flexi-finetune"
        out = "{tmp_path / 'runs'}"
        results = "{tmp_path / 'results.csv'}"
        [config]
        parent = "{tiny_parent}"
        steps = 2
        batch_size = 8
        device = "cpu"
        [grid]
        seed = [0]
        [evaluate]
        num_samples = 20
        steps = 3
        bootstrap = 20
        coarse_steps = [0, 2]
    """))
    rows = run_spec(read_spec(spec), device="cpu", log=lambda *_: None)
    assert sorted(r["name"] for r in rows) == ["flexi: seed=0, k = 0 coarse", "flexi: seed=0, k = 2 coarse"]
    by_k = {r["coarse_steps"]: r for r in rows}
    assert by_k[2]["gflops_per_image"] < by_k[0]["gflops_per_image"]  # coarse steps cost less
    assert run_spec(read_spec(spec), device="cpu", log=lambda *_: None) == []  # both rows done
    spec.write_text(spec.read_text().replace("coarse_steps = [0, 2]", "coarse_steps = 2"))
    with pytest.raises(ValueError, match="coarse_steps must be a list"):
        read_spec(spec)
