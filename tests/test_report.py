"""report.html: self-contained (no external src/href), every section, what is missing named; `lorasens report`."""

from __future__ import annotations

import base64
import json
from html import escape
from html.parser import HTMLParser

import pytest
from report_helpers import copy_run, png_size, tiny_run_dir, write_evaluation

from lorasens.cli import main
from lorasens.errors import UserError
from lorasens.presentation.report import SECTIONS, fmt, write_report


class Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.refs: list[tuple[str, str, str]] = []  # (tag, attribute, value)
        self.ids: set[str] = set()
        self.tags: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        for name, value in attrs:
            if name in ("src", "href", "srcset", "poster", "data"):
                self.refs.append((tag, name, value or ""))
            if name == "id":
                self.ids.add(value)


def parse(html: str) -> Links:
    parser = Links()
    parser.feed(html)
    return parser


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return tiny_run_dir(tmp_path_factory)


def test_report_written_at_the_end_of_the_run(run_dir):
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["report"] == str(run_dir / "report.html")
    assert summary["report_missing"] == ["synthetic_evaluation.json is missing (evaluation off or not run)"]
    html = (run_dir / "report.html").read_text()
    # Written before summary.json exists, yet complete: the run's own numbers stand in for it.
    assert "incomplete" not in html and "Run summary" in html
    assert f"<td>trainable_params</td><td class=\"num\">{summary['trainable_params']}</td>" in html


def test_report_states_the_metrics_note(run_dir, tmp_path):
    # Without Java the E2E scorer reports stand-ins under other names and a note; the report must say so.
    from lorasens.metrics.coco import NO_JAVA
    from lorasens.presentation.report import write_report

    copy = copy_run(run_dir, tmp_path / "run")
    write_evaluation(copy, {"bleu": 12.5, "meteor_nltk": 20.0, "metrics_note": NO_JAVA})
    write_report(copy, redraw=False)
    html = (copy / "report.html").read_text()
    assert "<b>Note:</b> no Java runtime" in html and "<td>meteor_nltk</td>" in html and "<td>metrics_note</td>" not in html


def test_report_is_self_contained_and_has_every_section(run_dir, tmp_path, capsys):
    copy = copy_run(run_dir, tmp_path / "run")
    write_evaluation(copy, {"bleu": 12.5, "rouge_l": 0.25}, baseline={"bleu": 2.5, "rouge_l": 0.05})
    (copy / "report.html").unlink()
    (copy / "layer_heatmap.png").unlink()
    # The run's own PNGs are embedded (test_plots redraws them all); the deleted one is drawn again.
    assert main(["report", str(copy), "--keep_plots"]) == 0
    assert png_size(copy / "layer_heatmap.png")[0] >= 400
    output = capsys.readouterr().out
    assert "7 plot(s)" in output and "missing" not in output
    html = (copy / "report.html").read_text()
    page = parse(html)
    assert "link" not in page.tags and "script" not in page.tags and "iframe" not in page.tags
    images = [v for tag, attr, v in page.refs if tag == "img"]
    assert len(images) == 7 and all(v.startswith("data:image/png;base64,") for v in images)
    for value in images:  # the embedded bytes are the PNG files themselves
        assert base64.b64decode(value.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert all(v.startswith("#") for tag, attr, v in page.refs if attr == "href")
    assert not [r for r in page.refs if r[0] != "img" and r[1] != "href"]
    assert "url(" not in html and "@import" not in html
    for key, title in SECTIONS:
        assert key in page.ids and title in html
    # Evaluation with baseline and delta.
    # The whole row: metric, fine-tuned, base model, delta (a bare "2.5" would also match inside "12.5").
    assert ('<tr><td>bleu</td><td class="num">12.5</td><td class="num">2.5</td><td class="num">10</td></tr>'
            in html)
    assert "<tr><td>rouge_l</td>" in html
    # Phases, sensitivity ranking, recommended config, from the run's own files.
    phases = json.loads((copy / "phases.json").read_text())
    assert all(t["label"] in html for t in phases["transitions"])
    sensitivity = json.loads((copy / "sensitivity.json").read_text())
    top = next(iter(sensitivity["rankings"].values()))[0]
    assert top in html
    # The size confound, the ablation's intervals and the parameter budget are shown with the run's own figures.
    assert "Size confound" in html and "Ablation with uncertainty" in html
    rho = sensitivity["size_correlation"]["raw"]["update_magnitude"]
    assert f"<td>update_magnitude</td><td class=\"num\">{fmt(rho)}</td>" in html
    key, (low, high) = next(iter(sensitivity["ablation"]["delta_ci"].items()))
    assert f"[{fmt(low)}, {fmt(high)}]" in html
    assert f"<td>params_used</td><td>{sensitivity['budget']['params_used']}</td>" in html
    assert "measured under a phase schedule" in html  # the tiny run trains both->mlp->attn
    recommended = json.loads((copy / "recommended_lora_config.json").read_text())
    assert escape(json.dumps(recommended, indent=2)) in html
    config = json.loads((copy / "config.json").read_text())
    assert config["model"]["model"] in html and "both-&gt;mlp-&gt;attn" in html


def test_an_eva_recommendation_shows_how_to_start_it(run_dir, tmp_path):
    # init_lora_weights "eva" needs a pass over training batches after get_peft_model: the usage shows it.
    copy = copy_run(run_dir, tmp_path / "eva")
    config = json.loads((copy / "recommended_lora_config.json").read_text())
    html = write_report(copy, redraw=False).path.read_text()
    assert "get_peft_model(model, config)" in html and "initialize_eva" not in html
    config.update(init_lora_weights="eva", eva_config={"rho": 1.0})
    (copy / "recommended_lora_config.json").write_text(json.dumps(config))
    html = write_report(copy, redraw=False).path.read_text()
    assert "get_peft_model(model, config, low_cpu_mem_usage=True)" in html
    assert "from lorasens import initialize_eva\ninitialize_eva(model, train_dataloader)" in html


def test_missing_files_are_named_and_the_rest_is_drawn(run_dir, tmp_path):
    copy = copy_run(run_dir, tmp_path / "partial")
    for name in ("sensitivity.json", "recommended_lora_config.json", "summary.json",
                 "gradient_analysis.group_norms.csv", "gradient_norms.png", "sensitivity_heatmap.png"):
        (copy / name).unlink()
    result = write_report(copy, redraw=False)
    missing = "\n".join(result.missing)
    for name in ("sensitivity.json", "recommended_lora_config.json", "summary.json",
                 "gradient_analysis.group_norms.csv", "synthetic_evaluation.json"):
        assert name in missing
    assert "gradient_norms.png" not in result.plots and "sensitivity_heatmap.png" not in result.plots
    assert "layer_heatmap.png" in result.plots
    html = result.path.read_text()
    assert "incomplete" in html and "Missing inputs" in html


def test_a_run_with_only_a_config_and_a_log(tmp_path, capsys):
    run = tmp_path / "early"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"model": {"model": "tiny-random-llama"}, "data": {"dataset": "e2e"}}))
    (run / "train_log.jsonl").write_text("".join(json.dumps({"step": s, "loss": 3.0 - 0.1 * s}) + "\n" for s in (1, 2, 3)))
    assert main(["report", str(run)]) == 0  # draws what it can, names the rest
    output = capsys.readouterr().out
    assert "1 plot(s)" in output and png_size(run / "training_loss.png")[0] >= 400
    assert "missing: gradient_norms.png: gradient_analysis.group_norms.csv is missing" in output
    assert "missing: e2e_evaluation.json is missing" in output
    assert "last train loss" in (run / "report.html").read_text()


def test_not_a_run_directory(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(UserError, match="not a lorasens run directory"):
        write_report(tmp_path)
    assert main(["report", str(tmp_path / "absent")]) == 2
    assert "is not a directory" in capsys.readouterr().err


def test_tensorboard_scalars_are_the_csv_norms(run_dir):
    # The tiny run reports to TensorBoard: group and layer norms are scalars, frozen steps have no point.
    import csv
    import math

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = list((run_dir / "checkpoints" / "runs").rglob("events.out.tfevents.*"))
    board = EventAccumulator(str(events))
    board.Reload()
    with (run_dir / "gradient_analysis.group_norms.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    for group in ("attn", "mlp", "total"):
        expected = [(int(r["step"]), float(r[group])) for r in rows if r[group] != ""]
        logged = [(e.step, e.value) for e in board.Scalars(f"gradients/group/{group}")]
        assert [s for s, _ in logged] == [s for s, _ in expected]
        assert all(math.isclose(a, b, rel_tol=1e-6) for (_, a), (_, b) in zip(logged, expected))
    assert [e.step for e in board.Scalars("gradients/group/attn")] == [1, 2, 5, 6]  # frozen in the mlp phase
    with (run_dir / "gradient_analysis.layer_norms.csv").open(newline="") as fh:
        layer3 = [(int(r["step"]), float(r["mlp"])) for r in csv.DictReader(fh) if r["layer"] == "3" and r["mlp"]]
    logged = [(e.step, e.value) for e in board.Scalars("gradients/layer_03/mlp")]
    assert [s for s, _ in logged] == [s for s, _ in layer3] == [1, 2, 3, 4]


def test_a_malformed_file_costs_only_its_section(run_dir, tmp_path):
    copy = copy_run(run_dir, tmp_path / "bad")
    (copy / "sensitivity.json").write_text(json.dumps({"modules": "oops", "measures": {"x": 3}, "rankings": {"x": 5}}))
    (copy / "sensitivity_heatmap.png").unlink()
    result = write_report(copy, redraw=False)
    assert any(line.startswith("sensitivity_heatmap.png: could not be drawn (TypeError") for line in result.missing)
    assert any(line.startswith("sensitivity: sensitivity.json has an unexpected format") for line in result.missing)
    assert len(result.missing) == 3  # the two above and the (absent) evaluation file
    html = result.path.read_text()
    recommended = json.loads((copy / "recommended_lora_config.json").read_text())
    assert escape(json.dumps(recommended, indent=2)) in html  # the other sections are still there
    assert all(key in parse(html).ids for key, _ in SECTIONS)


def test_answer_weighs_a_rank_allocation_by_each_modules_own_rank(tmp_path):
    from lorasens.presentation.answer import build_answer

    def module(layer, name, group, width):  # lora_params: the run's rank 8
        return {"key": f"L{layer}.{name}", "layer": layer, "group": group, "module": name, "in_features": width,
                "out_features": width, "lora_params": 8 * 2 * width}

    modules = [module(0, "q_proj", "attn", 100), module(0, "up_proj", "mlp", 100), module(1, "q_proj", "attn", 100),
               module(1, "up_proj", "mlp", 100)]
    ranks = {"L0.q_proj": 1, "L0.up_proj": 9, "L1.q_proj": 1, "L1.up_proj": 1}  # attention 400, MLP 2000 parameters
    budget = {"selected": list(ranks), "ranks": ranks, "params_total": 4 * 1600, "used_fraction": 1.0}
    (tmp_path / "sensitivity.json").write_text(json.dumps({"modules": modules, "budget": budget}))
    answer = build_answer(tmp_path)
    assert answer.split.startswith("Put LoRA on 4 of 4 modules at ranks 1–9 (38% of the all-module")
    assert "17% of them on attention (2 of 2 modules), 83% on MLP (2 of 2)" in answer.split
    assert answer.layers == "Top layers: 0, 1 (100% of the recommended parameters)."
    del budget["ranks"]  # --allocate modules: every selected module at the run's rank
    (tmp_path / "sensitivity.json").write_text(json.dumps({"modules": modules, "budget": budget}))
    assert "50% of them on attention" in build_answer(tmp_path).split
    assert build_answer(tmp_path).split.endswith("; 100% of the budget is used.")
    budget["init"] = "eva"  # --recommend_init eva: the answer says how the adapter starts
    (tmp_path / "sensitivity.json").write_text(json.dumps({"modules": modules, "budget": budget}))
    assert build_answer(tmp_path).split.endswith(
        "; 100% of the budget is used; LoRA starts from EVA (lorasens.initialize_eva in your own script).")
