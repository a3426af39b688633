"""Evaluation edge cases: the task list is checked before anything runs."""

from __future__ import annotations

import pytest

from nativevl.eval.runner import evaluate, evaluate_best_of_n


def _oracle(calls):
    def predictor(task, items):
        calls.append(task.name)
        return [it.answer for it in items]

    return predictor


def test_an_empty_task_list_is_an_error_not_an_empty_report():
    with pytest.raises(ValueError, match="no tasks"):
        evaluate(None, None, [], n=3, predictor=_oracle([]))
    with pytest.raises(ValueError, match="no tasks"):
        evaluate_best_of_n(None, None, [], n=3)


def test_an_unknown_task_fails_before_any_task_runs():
    calls = []
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        evaluate(None, None, ["shapes", "nope"], n=3, predictor=_oracle(calls))
    assert calls == []  # not after evaluating (with a model: generating for) the tasks before it
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        evaluate_best_of_n(None, None, ["shapes", "nope"], n=3)


@pytest.mark.parametrize("image", [5, "", [""], ["a.png", 3], {"path": "a.png"}])
def test_question_file_names_the_line_of_a_bad_image_field(tmp_path, image):
    import json

    from nativevl.pipelines.questions import jsonl_questions

    good = {"conversations": [{"from": "human", "value": "hi"}]}
    bad = {"image": image, "conversations": [{"from": "human", "value": "<image>\nwhat is this?"}]}
    f = tmp_path / "q.jsonl"
    f.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(ValueError, match=r"q\.jsonl:2: .*image"):
        jsonl_questions(f)


def test_question_file_names_the_line_of_a_missing_image(tmp_path):
    import json

    from nativevl.pipelines.questions import jsonl_questions

    rec = {"image": "missing.png", "conversations": [{"from": "human", "value": "<image>\nwhat is this?"}]}
    f = tmp_path / "q.jsonl"
    f.write_text(json.dumps(rec) + "\n")
    with pytest.raises(ValueError, match=r"q\.jsonl:1: .*missing\.png"):
        jsonl_questions(f)


def test_question_file_names_the_line_of_an_unreadable_image(tmp_path):
    import json

    from nativevl.pipelines.questions import jsonl_questions

    (tmp_path / "broken.png").write_bytes(b"not an image")
    rec = {"image": "broken.png", "conversations": [{"from": "human", "value": "<image>\nwhat is this?"}]}
    f = tmp_path / "q.jsonl"
    f.write_text(json.dumps(rec) + "\n")
    with pytest.raises(ValueError, match=r"q\.jsonl:1: "):
        jsonl_questions(f)
