"""deo/eval/report.py: the printed table says which few-shot sizes could not run, and why."""

from deo.eval.report import format_table


def test_table_marks_few_shot_sizes_the_data_cannot_fill():
    few = {"1": {"top1": 0.26}, "5": {"skipped": "the smallest class has 3 training samples, fewer than 5"}}
    report = {"dataset": {"multi_label": False, "n_train": 30, "n_test": 10, "classes": list("abc")},
              "config": {"few_shot": [1, 5]},
              "results": {"backbone/ms": {"knn": {"knn_avg": 0.5, "ks": [5]},
                                          "linear": {"top1": 0.4, "macro_f1": 0.3}, "few_shot": few}}}
    lines = format_table(report).splitlines()
    assert lines[0].split()[-2:] == ["1-shot", "5-shot"] and lines[2].split()[-2:] == ["26.0", "-"]
    assert lines[-1] == "few-shot 5-shot not run: the smallest class has 3 training samples, fewer than 5"
