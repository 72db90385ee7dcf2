"""`lorasens compare`: seeds aggregated as mean ± sample std (hand-computed), datasets marked, bad input named."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import pytest
from report_helpers import png_size, write_evaluation

from lorasens.cli import main
from lorasens.config import ExperimentConfig
from lorasens.errors import UserError
from lorasens.experiment.compare import compare_runs, mean_std


def make_run(root: Path, name: str, seed: int, bleu: float, rouge: float, target: str = "both",
             dataset: str = "synthetic", losses=(3.0, 2.5, 2.0)) -> Path:
    run = root / name
    run.mkdir(parents=True)
    cfg = ExperimentConfig().to_dict()
    cfg["model"]["model"] = "tiny-random-llama"
    cfg["data"]["dataset"] = dataset
    cfg["lora"]["target"] = target
    cfg["training"]["seed"] = seed
    cfg["output"].update(output_dir=str(root), experiment_name=name)
    (run / "config.json").write_text(json.dumps(cfg))
    (run / "train_log.jsonl").write_text("".join(json.dumps({"step": i + 1, "loss": v}) + "\n" for i, v in enumerate(losses)))
    (run / "eval_log.jsonl").write_text("".join(json.dumps({"step": s, "eval_loss": v + 0.1}) + "\n"
                                                for s, v in ((1, losses[0]), (len(losses), losses[-1]))))
    (run / "gradient_analysis.group_norms.csv").write_text(
        "step,phase,attn,mlp,total\n1,both,0.5,0.3,0.583\n2,mlp,,0.2,0.2\n3,both,0.4,0.1,0.412\n")
    (run / "summary.json").write_text(json.dumps({"steps": len(losses), "trainable_params": 1000}))
    write_evaluation(run, {"bleu": bleu, "rouge_l": rouge}, dataset=dataset)
    return run


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.slow
def test_two_seeds_give_the_hand_computed_mean_and_std(tmp_path):
    a = make_run(tmp_path, "both_seed1", 1, bleu=10.0, rouge=0.20, losses=(3.0, 2.5, 2.0))
    b = make_run(tmp_path, "both_seed2", 2, bleu=13.0, rouge=0.35, losses=(3.0, 2.6, 2.3))
    result = compare_runs([a, b], tmp_path / "cmp")
    rows = read_csv(tmp_path / "cmp" / "comparison.csv")
    assert len(rows) == 1 and rows[0]["n"] == "2" and rows[0]["seeds"] == "1 2"
    # By hand, from the two evaluation files: mean 11.5; sample std sqrt(((10-11.5)^2 + (13-11.5)^2) / (2-1)).
    bleu = [json.loads((r / "synthetic_evaluation.json").read_text())["metrics"]["bleu"] for r in (a, b)]
    assert bleu == [10.0, 13.0]
    assert float(rows[0]["bleu_mean"]) == pytest.approx(11.5)
    assert float(rows[0]["bleu_std"]) == pytest.approx((((10 - 11.5) ** 2 + (13 - 11.5) ** 2) / 1) ** 0.5)
    assert float(rows[0]["rouge_l_mean"]) == pytest.approx(0.275)
    assert float(rows[0]["rouge_l_std"]) == pytest.approx(statistics.stdev([0.20, 0.35]))
    assert float(rows[0]["final_train_loss_mean"]) == pytest.approx(2.15)
    assert float(rows[0]["final_eval_loss_std"]) == pytest.approx(statistics.stdev([2.1, 2.4]))
    # Late fall: the loss at step 1 (the last evaluation by 3/4 of 3 steps) minus the final one, 1.0 and 0.7.
    assert float(rows[0]["late_eval_fall_mean"]) == pytest.approx(0.85)
    assert result.mixed_datasets == []
    markdown = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "11.5 ± 2.1 (n=2)" in markdown  # std 2.1213 shown with 2 significant digits
    per_run = read_csv(tmp_path / "cmp" / "comparison_runs.csv")
    assert [r["run"] for r in per_run] == ["both_seed1", "both_seed2"] and float(per_run[1]["bleu"]) == 13.0
    for name in ("comparison_losses.png", "comparison_grad_norms.png"):
        assert png_size(tmp_path / "cmp" / name)[0] >= 400
    html = (tmp_path / "cmp" / "comparison.html").read_text()
    assert "11.5 ± 2.1 (n=2)" in html and 'src="http' not in html and "<script" not in html


@pytest.mark.slow
def test_configurations_are_kept_apart_and_a_single_run_has_no_std(tmp_path):
    runs = [make_run(tmp_path, "both_s1", 1, 10.0, 0.2), make_run(tmp_path, "both_s2", 2, 12.0, 0.3),
            make_run(tmp_path, "attn_s1", 1, 7.0, 0.1, target="attn")]
    result = compare_runs(runs, tmp_path / "cmp")
    rows = {r["target"]: r for r in read_csv(tmp_path / "cmp" / "comparison.csv")}
    assert rows["both"]["n"] == "2" and rows["attn"]["n"] == "1"
    assert rows["attn"]["bleu_mean"] == "7.0" and rows["attn"]["bleu_std"] == ""  # n=1: no std, not 0
    assert {g["label"] for g in result.groups} == {"target=both", "target=attn"}


def test_different_datasets_are_marked(tmp_path):
    runs = [make_run(tmp_path, "syn", 1, 10.0, 0.2), make_run(tmp_path, "e2e", 1, 30.0, 0.5, dataset="e2e")]
    result = compare_runs(runs, tmp_path / "cmp")
    assert result.mixed_datasets == ["e2e", "synthetic"] and len(result.groups) == 2
    assert "Different datasets: e2e, synthetic" in (tmp_path / "cmp" / "comparison.md").read_text()
    assert "Different datasets" in (tmp_path / "cmp" / "comparison.html").read_text()


@pytest.mark.slow
def test_missing_files_and_non_runs_are_named(tmp_path, capsys):
    good = make_run(tmp_path, "good", 1, 10.0, 0.2)
    partial = make_run(tmp_path, "partial", 2, 11.0, 0.2)
    (partial / "synthetic_evaluation.json").unlink()
    (partial / "summary.json").unlink()
    not_a_run = tmp_path / "notes"
    not_a_run.mkdir()
    result = compare_runs([good, partial, not_a_run], tmp_path / "cmp")
    assert [r.name for r in result.runs] == ["good", "partial"]
    assert result.skipped and "not a lorasens run directory" in result.skipped[0]
    partial_record = result.runs[1]
    assert not partial_record.complete and "summary.json is missing" in partial_record.missing
    assert "synthetic_evaluation.json is missing" in partial_record.missing
    rows = read_csv(tmp_path / "cmp" / "comparison.csv")
    assert rows[0]["n"] == "2" and rows[0]["bleu_mean"] == "10.0" and rows[0]["bleu_std"] == ""  # one value only
    with pytest.raises(UserError, match="nothing to compare"):
        compare_runs([not_a_run], tmp_path / "cmp2")
    assert main(["compare", str(not_a_run)]) == 2
    assert "nothing to compare" in capsys.readouterr().err


@pytest.mark.slow
def test_compare_command_default_out(tmp_path, capsys):
    runs = [make_run(tmp_path / "runs", f"r{s}", s, 10.0 + s, 0.2) for s in (1, 2)]
    assert main(["compare", *map(str, runs)]) == 0
    assert (tmp_path / "runs" / "comparison" / "comparison.html").exists()
    assert "11.5 ± 0.71 (n=2)" in capsys.readouterr().out


def test_mean_std_uses_the_sample_std():
    assert mean_std([1.0, 2.0, 3.0, 4.0]) == (2.5, statistics.stdev([1.0, 2.0, 3.0, 4.0]))
    assert mean_std([5.0]) == (5.0, None)


@pytest.mark.slow
def test_seed_stability_of_measures_and_recommendations(tmp_path):
    from lorasens.analysis.stats import random_jaccard

    keys = ["L0.q", "L0.k", "L1.q", "L1.k", "L2.q", "L2.k"]
    runs = []
    for seed, (grad, selected) in enumerate([([6, 5, 4, 3, 2, 1], ["L0.q", "L0.k"]),
                                             ([6, 4, 5, 3, 1, 2], ["L0.q", "L1.q"]),
                                             ([5, 6, 4, 3, 2, 1], ["L0.k", "L0.q"])], start=1):
        run = make_run(tmp_path, f"seed{seed}", seed, bleu=10.0, rouge=0.2)
        (run / "sensitivity.json").write_text(json.dumps({
            "modules": [{"key": k} for k in keys],
            "measures": {"grad_norm": dict(zip(keys, grad)), "combined": dict(zip(keys, grad[::-1]))},
            "budget": {"selected": selected}}))
        runs.append(run)
    result = compare_runs(runs, tmp_path / "cmp")
    rows = {r["measure"]: r for r in read_csv(tmp_path / "cmp" / "comparison_stability.csv")}
    assert set(rows) == {"grad_norm", "combined", "recommended"} and rows["grad_norm"]["pairs"] == "3"
    # Spearman by hand, 1 - 6 sum(d^2) / (n (n^2 - 1)) with n = 6: sum d^2 = 4 (seeds 1~2), 2 (1~3),
    # 8 (2~3).
    expected = [1 - 6 * 4 / 210, 1 - 6 * 2 / 210, 1 - 6 * 8 / 210]
    assert float(rows["grad_norm"]["spearman_mean"]) == pytest.approx(sum(expected) / 3)
    assert float(rows["grad_norm"]["spearman_min"]) == pytest.approx(min(expected))
    # Recommended sets {L0.q, L0.k}, {L0.q, L1.q}, {L0.k, L0.q}: Jaccard 1/3, 1, 1/3 -> mean 5/9.
    assert float(rows["recommended"]["jaccard_mean"]) == pytest.approx(5 / 9)
    assert float(rows["recommended"]["jaccard_random"]) == pytest.approx(random_jaccard(6, 2, 2))
    assert rows["recommended"]["spearman_mean"] == ""
    # grad_norm top-2: {L0.q, L0.k}, {L0.q, L1.q}, {L0.k, L0.q} as well.
    assert float(rows["grad_norm"]["jaccard_mean"]) == pytest.approx(5 / 9)
    assert len(result.stability) == 3
    assert "Seed stability" in (tmp_path / "cmp" / "comparison.md").read_text()
    assert "Jaccard of random sets" in (tmp_path / "cmp" / "comparison.html").read_text()
