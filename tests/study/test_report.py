"""The study's table and results.md, from hand-written results rows."""

from __future__ import annotations

from kd_lightning.study import format_table, load_study
from kd_lightning.study.results import format_choices, length_note, results_markdown
from tests.study.test_study import KD, STUDENT, write_study


def _rows(method, label, *values, seed0=0, **extra):
    return [{"method": method, "M": label, "seed": seed0 + i, "test_acc": v, "kind": "run",
             "candidate": "", "val_acc": "", **extra} for i, v in enumerate(values)]


def test_format_table_mean_std_and_best_marked():
    rows = _rows("A", "50", 60.0, 62.0) + _rows("B", "50", 70.0, 74.0)
    rows += _rows("A", "full", 90.0, 90.0) + _rows("B", "full", 80.0, 84.0)
    lines = format_table(rows, ["A", "B"], [50, None, 100]).splitlines()
    assert lines[0] == "| M | A | B |"
    assert lines[2] == "| 50 | 61.00 ± 1.41 | **72.00 ± 2.83** |"  # sample std over seeds
    assert lines[3] == "| full | **90.00 ± 0.00** | 82.00 ± 2.83 |"
    assert len(lines) == 4  # budget 100 has no results: no row


def test_one_run_per_cell_shows_the_mean_alone():
    rows = _rows("A", "50", 61.25) + _rows("B", "50", 70.5) + _rows("A", "full", 88.0)
    lines = format_table(rows, ["A", "B"], [50, None]).splitlines()
    assert lines[2] == "| 50 | 61.25 | **70.50** |"
    assert lines[3] == "| full | **88.00** | – |"  # B has no full-data result yet


def test_results_md_header_says_n_1_for_a_one_seed_study(tmp_path):
    spec = load_study(write_study(tmp_path, seeds=[3], methods=[STUDENT]))
    md = results_markdown(spec, "abc", _rows("student alone", "20", 55.0, seed0=3), 0.936)
    assert md.startswith("# Study `tiny` (hash abc)\n\nTest accuracy (%) of the student, one seed "
                         "(3; n=1, so no std); best per row in bold. 4 optimizer steps per run. "
                         "Teacher: 93.60%.\n\n")
    assert "| 20 | **55.00** |" in md and "±" not in md


def test_results_md_notes_single_runs_of_a_several_seed_study(tmp_path):
    spec = load_study(write_study(tmp_path, methods=[STUDENT, KD]))  # seeds 0 and 1
    rows = _rows("student alone", "20", 50.0, 52.0) + _rows("ResponseKD", "20", 57.0)
    md = results_markdown(spec, "abc", rows, None)
    assert "mean ± std over seeds [0, 1]" in md and "Teacher" not in md
    assert "| 20 | 51.00 ± 1.41 | **57.00** |" in md
    assert "A cell without ± holds one run so far (n=1)." in md


def test_choices_table_names_the_chosen_candidate_per_budget(tmp_path):
    kd = {**KD, "grid": {"model.init_args.temperature": [1.0, 4.0]}}
    spec = load_study(write_study(tmp_path, methods=[STUDENT, kd], seeds=[0]))
    t1, t4 = '{"model.init_args.temperature": 1.0}', '{"model.init_args.temperature": 4.0}'
    rows = (_rows("ResponseKD", "20", "", kind="candidate", candidate=t1, val_acc=40.0)
            + _rows("ResponseKD", "20", "", kind="candidate", candidate=t4, val_acc=45.5)
            + _rows("ResponseKD", "50", "", kind="candidate", candidate=t1, val_acc=50.0))
    assert format_choices(rows, spec).splitlines() == [
        "| M (labelled examples) | ResponseKD |", "|---|---|",
        "| 20 | **temperature=4.0** (val 45.50; temperature=1.0: 40.00) |",
        "| 50 | (not all trained; temperature=1.0: 50.00) |"]
    assert format_table(rows, ["student alone", "ResponseKD"], [20, 50]).count("\n") == 1  # no test yet


def test_length_note_per_budget(tmp_path):
    spec = load_study(write_study(tmp_path, budgets=[20, 50, "full"], steps={20: 4, "default": 6},
                                  epochs={"full": 2}))
    assert length_note(spec) == ("Training length: M=20: 4 steps, M=50: 6 steps, full: 2 epochs "
                                 "(steps are optimizer steps).")


def test_results_md_names_each_environment_under_the_table(tmp_path):
    spec = load_study(write_study(tmp_path, methods=[STUDENT]))
    env = {"python": "3.11.7", "torch": "2.4.0", "pytorch_lightning": "2.4.0", "cpu": "AMD EPYC",
           "cpu_capability": "AVX512", "threads": 2, "overrides": {}, "accelerator": "cpu", "devices": 1}
    rows = _rows("student alone", "20", 50.0, 52.0)
    md = results_markdown(spec, "abc", rows, None, [env])
    table_end = md.index("| 20 |")
    assert md.index("\nEnvironment: torch 2.4.0, pytorch-lightning 2.4.0, Python 3.11.7; AMD EPYC (AVX512 "
                    "kernels), 2 threads; cpu.\n") > table_end
    avx2 = {**env, "cpu_capability": "AVX2", "overrides": {"ATEN_CPU_CAPABILITY": "avx2"}}
    md = results_markdown(spec, "abc", rows, None, [env, avx2])
    assert "Environment 1: " in md and "Environment 2: " in md and "(AVX2 kernels, ATEN_CPU_CAPABILITY=avx2)" in md
    assert "Environment" not in results_markdown(spec, "abc", rows, None)
