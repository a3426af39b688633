"""Evaluation sets from files: VLMEvalKit benchmark TSVs (multiple choice and open answers) and InternVL
conversation jsonl, written here in those formats; scoring, chance, reports, the CLI and resuming."""

from __future__ import annotations

import base64
import csv
import io
import json

import numpy as np
import pytest
from PIL import Image

from nativevl.eval.runner import evaluate
from nativevl.eval.tasks import get_task
from nativevl.eval.tasks.files import open_answer_correct, option_letter

NAN = "nan"  # how pandas (VLMEvalKit) writes a missing value


def png_b64(seed: int, size=(40, 24)) -> tuple[str, np.ndarray]:
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode(), pixels


def write_tsv(path, rows: list[dict]) -> None:
    columns = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, columns, delimiter="\t")
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, NAN) for k in columns})


def mmbench_rows() -> tuple[list[dict], np.ndarray]:
    img0, pixels0 = png_b64(0)
    img2, _ = png_b64(2)
    rows = [
        {"index": 10, "question": "What animal is shown?", "hint": "A farm photo.", "A": "cat", "B": "dog", "C": "cow",
         "D": "hen", "answer": "C", "image": img0, "category": "animals"},
        # shares row 10's image (VLMEvalKit writes the other row's index); three options only
        {"index": 11, "question": "Which colour dominates?", "hint": NAN, "A": "red", "B": "green", "C": "blue",
         "D": NAN, "answer": "B", "image": "10", "category": "colours"},
        {"index": 12, "question": "How many objects?", "hint": NAN, "A": "1", "B": "2", "C": "3", "D": "4",
         "answer": "D", "image": img2, "category": "counting"},
    ]
    return rows, pixels0


def test_benchmark_tsv_reads_as_vlmevalkit_writes_it(tmp_path):
    rows, pixels0 = mmbench_rows()
    write_tsv(tmp_path / "mmb.tsv", rows)
    items = get_task(str(tmp_path / "mmb.tsv")).load(10, seed=0)
    assert [it.answer for it in items] == ["C", "B", "D"]
    assert items[0].question == ("<image>\nA farm photo.\nWhat animal is shown?\nA. cat\nB. dog\nC. cow\nD. hen\n"
                                 "Answer with the option's letter from the given choices directly.")
    assert items[1].options == {"A": "red", "B": "green", "C": "blue"} and items[1].question.startswith("<image>\nWhich")
    assert np.array_equal(np.asarray(items[0].images[0]), pixels0)
    assert np.array_equal(np.asarray(items[1].images[0]), pixels0)  # the shared image
    assert [it.kind for it in items] == ["animals", "colours", "counting"]
    assert len(get_task(str(tmp_path / "mmb.tsv")).load(2, seed=0)) == 2  # --n: the file's first n
    assert len(get_task(str(tmp_path / "mmb.tsv")).load(None, seed=0)) == 3  # without: all of it
    # a row that shares the image of a row past --n: read in the same pass
    rows[0]["image"], rows[2]["image"] = "12", rows[0]["image"]
    write_tsv(tmp_path / "later.tsv", rows)
    (first,) = get_task(str(tmp_path / "later.tsv")).load(1, seed=0)
    assert np.array_equal(np.asarray(first.images[0]), pixels0)


def test_majority_vote_groups_option_answers_by_their_letter():
    """Best-of-N's vote on a benchmark file counts "B.", "(B)" and "The answer is B" as one answer."""
    from nativevl.eval.tasks.files import FileItem, FileTask
    from nativevl.infer.best_of_n import Candidates

    item = FileItem("q", "B", [], "", {"A": "cat", "B": "dog"})
    task = FileTask("x.tsv")
    texts = ["A", "B.", "(B)", "The answer is B"]
    assert Candidates(texts).pick("majority") == 0  # as text, four different answers: the first wins
    assert Candidates(texts, vote_key=lambda t: task.vote_key(t, item)).pick("majority") == 1
    # unread samples have no vote: three empty ones do not out-vote two B's
    texts = ["", "B", "", "B", "A", ""]
    assert Candidates(texts, vote_key=lambda t: task.vote_key(t, item)).pick("majority") == 1


def test_benchmark_tsv_rows_refused_by_name(tmp_path):
    """A circular file read with --n checked no columns (a bare KeyError for MMBench's TEST files, which
    have no answers); a question holding its own <image> marks for another number of images failed only
    when asked; an answer list whose first entry is punctuation was refused whole."""
    rows, _ = mmbench_rows()
    write_tsv(tmp_path / "MMBench_TEST_EN.tsv", [{k: v for k, v in r.items() if k != "answer"} for r in rows])
    for n in (None, 2):
        with pytest.raises(ValueError, match="needs the columns question and answer; missing \\['answer'\\]"):
            get_task(str(tmp_path / "MMBench_TEST_EN.tsv")).load(n, seed=0)
    img, _ = png_b64(1)
    write_tsv(tmp_path / "two.tsv", [{"index": 0, "question": "<image> and <image>: same?", "answer": "yes",
                                      "image": img}])
    with pytest.raises(ValueError, match="two.tsv:2: the question holds 2 <image> mark\\(s\\) but the row has 1"):
        get_task(str(tmp_path / "two.tsv")).load(None, seed=0)
    answers = str(["?"] + ["stop"] * 9)
    write_tsv(tmp_path / "TextVQA_VAL.tsv", [{"index": 0, "question": "What does the sign say?", "answer": answers,
                                             "image": img}])
    (item,) = get_task(str(tmp_path / "TextVQA_VAL.tsv")).load(None, seed=0)
    assert get_task(str(tmp_path / "TextVQA_VAL.tsv")).score("stop", item) == 1.0
    write_tsv(tmp_path / "OCRBench.tsv", [{"index": 0, "question": "Read it", "answer": "['+']", "image": img,
                                          "category": "Digit String Recognition"}])
    (item,) = get_task(str(tmp_path / "OCRBench.tsv")).load(None, seed=0)  # its rule keeps punctuation
    write_tsv(tmp_path / "plain.tsv", [{"index": 0, "question": "Sign?", "answer": "?", "image": img}])
    with pytest.raises(ValueError, match="is empty once normalised"):
        get_task(str(tmp_path / "plain.tsv")).load(None, seed=0)


def test_option_letters_and_open_answers_are_read_as_a_reader_would():
    options = {"A": "a cat", "B": "dog", "C": "cow"}
    for prediction, want in [("B", "B"), ("(B)", "B"), ("B. dog", "B"), ("C) cow", "C"), ("The answer is C.", "C"),
                             ("Answer: (A)", "A"), ("The answer is: B", "B"), ("The correct option is B.", "B"),
                             ("dog", "B"), ("a cat", "A"), ("A cow", "C"), ("cat or dog", None), ("", None),
                             ("D", None), ("Option B", "B"), ("B is wrong, the answer is C", "C"),
                             # naming several options picks none (it was scored by the first)
                             ("B and C", None), ("A or B", None), ("B C", None), ("A and B are both correct", None),
                             ("The answer is A or B", None)]:
        assert option_letter(prediction, options) == want, prediction
    assert option_letter("a dog", options) == "B"  # an article, not option A
    # options whose own text holds a capital letter, repeated in the answer
    cars = {"A": "A blue car", "B": "A red car", "C": "Vitamin C"}
    for prediction, want in [("B. A red car", "B"), ("(B) A red car", "B"), ("The answer is B. A red car", "B"),
                             ("A red car", "B"), ("Vitamin C", "C"), ("C. Vitamin C", "C"), ("A", "A")]:
        assert option_letter(prediction, cars) == want, prediction
    assert option_letter("The answer is Vitamin C", cars) == "C"  # an option's text named, no letter
    # a leading letter is a choice even when the options' texts are letters (AI2D's diagram labels), and
    # a sentence's opening article is not option A
    labels = {"A": "D", "B": "C", "C": "A", "D": "B"}
    for prediction in ("C", "C.", "(C)", "C. A"):
        assert option_letter(prediction, labels) == "C", prediction
    animals = {"A": "dog", "B": "cat", "C": "cow"}
    for prediction, want in [("A. cat", "A"), ("A cat is sitting on the mat.", "B"), ("A is right", "A"),
                             ("The answer is A because it barks", "A"), ("A dog or a cat", None)]:
        assert option_letter(prediction, animals) == want, prediction
    assert open_answer_correct("The Eiffel Tower.", "eiffel tower")
    assert open_answer_correct("paris", "['Paris', 'Paris, France']") and open_answer_correct("Paris, France", '["x", "paris, france"]')
    assert open_answer_correct("1,000", "1000") and not open_answer_correct("1985", "1990")  # exact, as TextVQA
    assert open_answer_correct("12.5", "12", relaxed=True) and not open_answer_correct("13", "12", relaxed=True)
    assert open_answer_correct("50%", "0.5", relaxed=True)  # ChartQA's relaxed accuracy: within 5%
    assert not open_answer_correct("", "0") and not open_answer_correct("london", "['Paris']")
    # an answer that is only an article-like word is the answer, and an empty prediction never matches it
    assert open_answer_correct("A", "a") and not open_answer_correct("", "A") and not open_answer_correct("the", "a")


def test_file_tasks_score_report_and_resume(tmp_path):
    rows, _ = mmbench_rows()
    write_tsv(tmp_path / "mmb.tsv", rows)
    img, _ = png_b64(5)
    write_tsv(tmp_path / "vqa.tsv", [
        {"index": 0, "question": "What is written?", "answer": "['stop', 'stop sign']", "image": img},
        {"index": 1, "question": "What is the total?", "answer": "120", "image": img},
    ])
    (tmp_path / "custom.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"conversations": [{"from": "human", "value": "Which is larger?\nA. 3\nB. 7"}, {"from": "gpt", "value": "B"}]},
        {"conversations": [{"from": "human", "value": "Capital of France?"}, {"from": "gpt", "value": "Paris"}]},
    ]))
    tasks = [str(tmp_path / f) for f in ("mmb.tsv", "vqa.tsv", "custom.jsonl")]
    answers = {"mmb.tsv": ["C", "The answer is A.", "4"], "vqa.tsv": ["Stop sign", "120"],
               "custom.jsonl": ["(B)", "paris."]}
    asked = []

    def predictor(task, items):
        asked.append(task.name)
        return answers[task.name.rsplit("/", 1)[-1]][: len(items)]

    report = evaluate(None, None, tasks, n=5, predictor=predictor, model_name="m", max_num=2)
    mmb, vqa, custom = (report[t] for t in tasks)
    assert (mmb["correct"], mmb["n"]) == (2, 3)  # "The answer is A." for B is wrong
    assert [r["correct"] for r in mmb["records"]] == [True, False, True]
    assert mmb["chance"] == pytest.approx((1 / 4 + 1 / 3 + 1 / 4) / 3)
    assert (vqa["correct"], custom["correct"]) == (2, 2)
    assert custom["records"][0]["answer"] == "B"
    assert mmb["settings"]["max_num"] == 2 and mmb["settings"]["file"]
    # resumed: every task reused, none asked again; another max_num asks again
    asked.clear()
    assert evaluate(None, None, tasks, n=5, predictor=predictor, model_name="m", max_num=2, previous=report) == report
    assert asked == []
    evaluate(None, None, tasks[:1], n=5, predictor=predictor, model_name="m", max_num=3, previous=report)
    assert asked == tasks[:1]


def test_bad_benchmark_files_are_named(tmp_path):
    write_tsv(tmp_path / "a.tsv", [{"index": 0, "prompt": "x", "answer": "A"}])
    with pytest.raises(ValueError, match="needs the columns question and answer; missing \\['question'\\]"):
        get_task(str(tmp_path / "a.tsv")).load(5, 0)
    write_tsv(tmp_path / "b.tsv", [{"index": 0, "question": "q", "A": "x", "B": "y", "answer": "E"}])
    with pytest.raises(ValueError, match="b.tsv:2: the answer 'E' is not one of the options"):
        get_task(str(tmp_path / "b.tsv")).load(5, 0)
    write_tsv(tmp_path / "c.tsv", [{"index": 0, "question": "q", "answer": "y", "image": "bm90IGFuIGltYWdl" * 8}])
    with pytest.raises(ValueError, match="c.tsv:2: the image is not a readable base64 picture"):
        get_task(str(tmp_path / "c.tsv")).load(5, 0)
    write_tsv(tmp_path / "e.tsv", [{"index": 0, "question": "q", "answer": "y", "image": "[not json"}])
    with pytest.raises(ValueError, match="e.tsv:2: the image list is neither JSON nor a Python list"):
        get_task(str(tmp_path / "e.tsv")).load(5, 0)
    write_tsv(tmp_path / "f.tsv", [{"index": 0, "question": "q", "answer": "y", "image": "7"}])
    with pytest.raises(ValueError, match="f.tsv:2: the image names index 7, which is not a row with an image"):
        get_task(str(tmp_path / "f.tsv")).load(5, 0)
    write_tsv(tmp_path / "h.tsv", [{"index": 0, "question": "q", "answer": "y", "image": "1"},
                                   {"index": 1, "question": "q", "answer": "y"}])
    with pytest.raises(ValueError, match="h.tsv:2: the image names index 1, which is not a row with an image"):
        get_task(str(tmp_path / "h.tsv")).load(1, 0)
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / "ok.png")
    (tmp_path / "i.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"image": "ok.png", "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]},
        {"image": "gone.png", "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]}]))
    with pytest.raises(ValueError, match="cannot be read"):  # a custom set's question is never dropped silently
        get_task(str(tmp_path / "i.jsonl")).load(None, 0)
    write_tsv(tmp_path / "g.tsv", [{"index": 0, "question": "q", "answer": NAN}])
    with pytest.raises(ValueError, match="g.tsv:2: no answer to score against"):
        get_task(str(tmp_path / "g.tsv")).load(5, 0)
    with pytest.raises(FileNotFoundError, match="missing.tsv does not exist"):
        get_task(str(tmp_path / "missing.tsv"))
    with pytest.raises(ValueError, match="unknown task 'mmbench'.*benchmark file"):
        get_task("mmbench")
    (tmp_path / "d.jsonl").write_text(json.dumps({"conversations": [{"from": "human", "value": "q"}]}) + "\n")
    with pytest.raises(ValueError, match="question 1 has no answer"):
        get_task(str(tmp_path / "d.jsonl")).load(5, 0)


def test_eval_cli_on_a_benchmark_tsv(tmp_path, tokenizer, capsys):
    from test_model import make_model

    from nativevl.cli import main

    make_model().save_pretrained(tmp_path / "m", tokenizer=tokenizer)
    rows, _ = mmbench_rows()
    write_tsv(tmp_path / "mmb.tsv", rows)
    out = tmp_path / "eval.json"
    args = ["eval", "--model", str(tmp_path / "m"), "--tasks", f"{tmp_path / 'mmb.tsv'},shapes", "--n", "3",
            "--max_num", "2", "--out", str(out)]
    assert main(args) == 0
    report = json.loads(out.read_text())
    task = report[str(tmp_path / "mmb.tsv")]
    assert task["n"] == 3 and len(task["records"]) == 3 and task["settings"]["max_num"] == 2
    assert "max_num" not in report["shapes"]["settings"]  # toy tasks: one tile, settings as before
    assert str(tmp_path / "mmb.tsv") in capsys.readouterr().out


def test_best_of_n_on_a_benchmark_file_scores_multi_tile_images_with_the_prm(tmp_path, tokenizer, monkeypatch):
    """With several tiles per image the PRM gets each image's own tile count, read from the prompt."""
    import torch
    from test_alignment import tiny_config

    from nativevl.eval.runner import evaluate_best_of_n
    from nativevl.model.vlm import VisionLanguageModel

    rows, _ = mmbench_rows()
    wide, _ = png_b64(7, size=(96, 24))  # a wide picture: several tiles at max_num 4
    rows[2]["image"] = wide
    write_tsv(tmp_path / "mmb.tsv", rows)
    seen = []
    from nativevl.infer import prm as prm_module

    real = prm_module.step_scores  # the runner imports it from infer.prm when it runs

    def spy(prm, tokenizer, question, texts, tiles, per_image, **kw):
        seen.append((per_image, 0 if tiles is None else int(tiles.shape[0])))
        return real(prm, tokenizer, question, texts, tiles, per_image, **kw)

    monkeypatch.setattr(prm_module, "step_scores", spy)
    torch.manual_seed(0)
    model = VisionLanguageModel(tiny_config()).eval()
    report = evaluate_best_of_n(model, tokenizer, [str(tmp_path / "mmb.tsv")], n=3, samples=2, prm=model, max_num=4)
    entry = report[str(tmp_path / "mmb.tsv")]
    assert entry["pass1"]["n"] == 3 and entry["settings"]["max_num"] == 4
    assert all(sum(per_image) == n_tiles for per_image, n_tiles in seen) and len(seen) == 3
    assert max(seen[2][0]) > 1  # the wide picture went in several tiles, and the PRM was told so


def test_partial_credit_metrics_for_files_named_as_vlmevalkit_names_them(tmp_path):
    """DocVQA / InfoVQA files: ANLS; TextVQA / VQAv2: VQA accuracy from the annotators' answers; the
    report's score is their mean, marked with the metric, and the paired test and Best-of-N refuse them."""
    from nativevl.eval.runner import compare, evaluate, evaluate_best_of_n
    from nativevl.eval.tasks.files import anls, vqa_accuracy

    ten = ["two"] * 3 + ["3"] * 7
    assert vqa_accuracy("2", ten) == pytest.approx(0.9)  # 3 of 10 annotators: 0.9, as the official eval
    assert vqa_accuracy("three", ten) == 1.0 and vqa_accuracy("4", ten) == 0.0
    assert vqa_accuracy("2", ["2"] + ["x"] * 9) == pytest.approx(0.3) and vqa_accuracy("", ten) == 0.0
    assert anls("Hello World", ["hello word"]) == pytest.approx(1 - 1 / 11)
    assert anls("abc", ["xyz"]) == 0.0 and anls("a", ["b", "A"]) == 1.0  # the best answer counts
    img, _ = png_b64(1)
    write_tsv(tmp_path / "DocVQA_VAL.tsv", [
        {"index": 0, "question": "What is the date?", "answer": "['March 3, 1998']", "image": img},
        {"index": 1, "question": "Who signed?", "answer": "['J. Smith', 'John Smith']", "image": img}])
    write_tsv(tmp_path / "TextVQA_VAL.tsv", [
        {"index": 0, "question": "What does it say?", "answer": str(ten), "image": img}])
    tasks = [str(tmp_path / "DocVQA_VAL.tsv"), str(tmp_path / "TextVQA_VAL.tsv")]
    answers = {"DocVQA_VAL.tsv": ["March 3, 1998", "Jon Smith"], "TextVQA_VAL.tsv": ["two"]}
    report = evaluate(None, None, tasks, n=None, model_name="m",
                      predictor=lambda task, items: answers[task.name.rsplit("/", 1)[-1]])
    doc, text = report[tasks[0]], report[tasks[1]]
    assert doc["metric"] == "anls" and doc["accuracy"] == pytest.approx((1 + (1 - 1 / 10)) / 2)
    assert [r["correct"] for r in doc["records"]] == pytest.approx([1.0, 0.9])
    assert text["metric"] == "vqa" and text["accuracy"] == pytest.approx(0.9)
    with pytest.raises(ValueError, match="partial credit"):
        compare(report, report, tasks[0])
    with pytest.raises(ValueError, match="partial credit"):
        evaluate_best_of_n(None, None, tasks, n=1)


def test_eval_under_torchrun_equals_one_process(tmp_path, tokenizer):
    """2 gloo processes split the questions (each its share, images decoded there) and gather every
    record: the report equals 1 process's, for a benchmark file (partial credit), a circular one and a toy
    task."""
    import os
    import subprocess
    import sys

    from test_model import make_model

    make_model().save_pretrained(tmp_path / "m", tokenizer=tokenizer)
    img, _ = png_b64(1)
    write_tsv(tmp_path / "TextVQA_VAL.tsv", [
        {"index": i, "question": f"What does it say {i}?", "answer": "['a', 'b', 'c']", "image": img} for i in range(5)])
    # a circular file: each rank takes whole questions, each with its rotations (one picture per question)
    write_tsv(tmp_path / "MMBench_DEV_EN.tsv", [
        {"index": q + k * 1_000_000, "question": f"Which {q}?", "A": "xy"[k], "B": "yx"[k], "answer": "AB"[k],
         "image": png_b64(q)[0] if k == 0 else str(q)} for k in range(2) for q in range(5)])
    # --num_questions: torchrun's own parser would read --n as an abbreviation of its options
    args = ["eval", "--model", str(tmp_path / "m"), "--tasks",
            f"{tmp_path / 'TextVQA_VAL.tsv'},{tmp_path / 'MMBench_DEV_EN.tsv'},shapes", "--num_questions", "5",
            "--max_num", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "nativevl", *args, "--out", str(tmp_path / "two.json")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    one = subprocess.run([sys.executable, "-m", "nativevl", *args, "--out", str(tmp_path / "one.json")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    for task in a:
        rows = [r for g in a[task]["records"] for r in g.get("rows", [g])]
        assert rows == [r for g in b[task]["records"] for r in g.get("rows", [g])]
        assert a[task]["accuracy"] == pytest.approx(b[task]["accuracy"]) and a[task]["n"] == b[task]["n"] == 5
        assert len(rows) == (10 if "MMBench" in task else 5)
        assert isinstance(b[task]["correct"], int) == (not task.endswith("VAL.tsv"))  # partial credit stays a float


def test_a_toy_task_asked_without_n_resumes_a_report_made_with_n_200():
    asked = []

    def predictor(task, items):
        asked.append(len(items))
        return ["?"] * len(items)

    report = evaluate(None, None, ["shapes"], n=200, predictor=predictor, model_name="m")
    assert report["shapes"]["settings"]["n"] == 200
    assert evaluate(None, None, ["shapes"], n=None, predictor=predictor, model_name="m", previous=report) == report
    assert asked == [200]  # the default (200 of a toy task) is the same setting: nothing asked again


def test_mmbench_files_are_scored_circularly_as_vlmevalkit_scores_them(tmp_path):
    """MMBench's TSVs hold each question once more per rotation of its options (index + k * 1,000,000,
    sharing the image): the question is right only when every rotation is. --n counts questions, each
    with all its rotations wherever they are in the file; a file of another name scores rows."""
    img, _ = png_b64(0)
    opts = ["cat", "dog", "cow"]

    def rotations(index, answer_at, question):
        rows = []
        for k in range(3):  # the options rotated k places; the answer's letter moves with them
            shifted = opts[k:] + opts[:k]
            rows.append({"index": index + k * 1_000_000, "question": question, "A": shifted[0], "B": shifted[1],
                         "C": shifted[2], "answer": "ABC"[shifted.index(opts[answer_at])],
                         "image": img if k == 0 else str(index), "category": "animals"})
        return rows

    q1, q2, q3 = rotations(1, 2, "Which animal?"), rotations(2, 0, "Which pet?"), rotations(3, 1, "Which one barks?")
    # as VLMEvalKit sorts them: the questions first, their rotations after; one rotation placed before its question
    rows = [q1[0], q2[0], q3[1], q3[0], q1[1], q2[1], q1[2], q2[2], q3[2]]
    write_tsv(tmp_path / "MMBench_DEV_EN.tsv", rows)
    write_tsv(tmp_path / "plain_mcq.tsv", rows)

    def predictor(task, items):  # right everywhere but the last rotation of question 2
        return ["Z" if it.index == "2000002" else it.answer for it in items]

    path = str(tmp_path / "MMBench_DEV_EN.tsv")
    report = evaluate(None, None, [path], n=None, predictor=predictor, model_name="m")[path]
    assert (report["correct"], report["n"], report["rows"]) == (2, 3, 9)
    assert report["metric"] == "circular" and report["row_accuracy"] == pytest.approx(8 / 9)
    assert [r["correct"] for r in report["records"]] == [True, False, True]
    assert [len(r["rows"]) for r in report["records"]] == [3, 3, 3]
    assert report["chance"] == pytest.approx((1 / 3) ** 3)
    items = get_task(path).load(2, seed=0)  # two questions, with all their rotations
    assert sorted(it.index for it in items) == sorted(["1", "1000001", "1000002", "2", "2000001", "2000002"])
    assert {it.question.split("\n")[1] for it in items} == {"Which animal?", "Which pet?"}
    (first,) = [it for it in get_task(path).load(3, seed=0) if it.index == "1000003"]  # read before its question
    assert np.array_equal(np.asarray(first.images[0]), np.asarray(get_task(path).load(1, seed=0)[0].images[0]))
    plain = str(tmp_path / "plain_mcq.tsv")
    rows_report = evaluate(None, None, [plain], n=None, predictor=predictor, model_name="m")[plain]
    assert (rows_report["correct"], rows_report["n"]) == (8, 9) and "metric" not in rows_report


def test_ocrbench_scores_an_answer_found_in_the_prediction():
    """OCRBench.tsv is scored by its own rule: any answer inside the prediction (case and newlines
    ignored), handwritten formulas with every space removed and case kept; other files stay exact."""
    from nativevl.eval.tasks.files import FileItem, FileTask

    task = FileTask("data/OCRBench.tsv")
    assert task.metric == "ocrbench" and task.binary and FileTask("OCRBench_v2.tsv").metric == "exact"
    text = FileItem("q", "['CENTRE', 'center']", kind="Regular Text Recognition")
    formula = FileItem("q", "['x^{2} + 1']", kind="Handwritten Mathematical Expression Recognition")
    assert task.score("The word is Centre.", text) and task.score("it reads\ncenter", text)
    assert not task.score("centr", text)
    assert task.score("$x^{2}\n+1$", formula) and not task.score("X^{2}+1", formula)
    assert not FileTask("words.tsv").score("The word is Centre.", text)  # exact match elsewhere


def test_circular_files_edge_cases(tmp_path):
    """A rotation read before its question, naming an image of a later row, still finds it with --n;
    a rotation whose question the file lacks is not scored (as VLMEvalKit); a report scored before
    circular scoring is not reused by --resume."""
    img, pixels = png_b64(3)
    base = {"question": "Which?", "A": "x", "B": "y", "answer": "A", "category": "c"}
    rows = [{**base, "index": 1000002, "image": "9"}, {**base, "index": 2, "image": img},
            {**base, "index": 9, "image": img}, {**base, "index": 1000077, "image": img}]  # 77: no question row
    write_tsv(tmp_path / "MMBench_x.tsv", rows)
    path = str(tmp_path / "MMBench_x.tsv")
    items = get_task(path).load(1, seed=0)
    assert sorted(it.index for it in items) == ["1000002", "2"]
    assert np.array_equal(np.asarray(items[0].images[0]), pixels)
    assert sorted(it.index for it in get_task(path).load(None, seed=0)) == ["1000002", "2", "9"]

    asked = []

    def predictor(task, items):
        asked.append(len(items))
        return ["A"] * len(items)

    report = evaluate(None, None, [path], n=None, predictor=predictor, model_name="m")
    assert (report[path]["n"], report[path]["correct"]) == (2, 2)
    old = json.loads(json.dumps(report))
    del old[path]["settings"]["scoring"]  # as written before circular scoring
    evaluate(None, None, [path], n=None, predictor=predictor, model_name="m", previous=old)
    assert asked == [3, 3]  # asked again, not reused


def test_best_of_n_on_a_circular_file_scores_whole_questions_and_encodes_each_picture_once(tmp_path, tokenizer,
                                                                                          monkeypatch):
    """Best-of-N on an MMBench file: each method's pick counts for a question only when it is right on every
    rotation, a single sample's accuracy is the product over the rotations; each picture runs through the
    ViT once (its rotations, and the samples after the greedy answers, take it from the vision cache)."""
    from test_model import make_model

    from nativevl.data.images import image_to_tiles
    from nativevl.eval.runner import evaluate_best_of_n
    from nativevl.eval.tasks.files import FileTask

    pictures = [png_b64(40 + q, size=(96, 24) if q else (24, 24)) for q in range(2)]
    rows = [{"index": q + 1 + k * 1_000_000, "question": f"Which {q}?", "A": "xy"[k], "B": "yx"[k], "answer": "AB"[k],
             "image": pictures[q][0] if k == 0 else str(q + 1)} for k in range(2) for q in range(2)]
    path = str(tmp_path / "MMBench_DEV_EN.tsv")
    write_tsv(path, rows)
    right = {"1", "1000001", "1000002"}  # question 1 right on both rotations, question 2 on its rotation only
    monkeypatch.setattr(FileTask, "score", lambda self, prediction, item: item.index in right)
    model = make_model()
    size = model.config.vision.image_size
    tiles = [image_to_tiles(Image.fromarray(p), image_size=size, max_num=2).shape[0] for _, p in pictures]
    seen = []
    model.vision_tower.register_forward_hook(lambda mod, args, out: seen.append(args[0].shape[0]))
    entry = evaluate_best_of_n(model, tokenizer, [path], n=None, samples=3, max_num=2)[path]
    assert entry["metric"] == "circular" and entry["rows"] == 4 and entry["pass1"]["n"] == 2
    assert [g["pass1"] for g in entry["records"]] == [True, False] and entry["pass1"]["correct"] == 1
    assert [g["majority3"] for g in entry["records"]] == [True, False]
    assert [g["sample_accuracy"] for g in entry["records"]] == [1.0, 0.0]
    assert entry["sample_mean"]["accuracy"] == 0.5
    assert [[r["index"] for r in g["rows"]] for g in entry["records"]] == [[0, 2], [1, 3]]  # the file's rows
    assert sum(seen) == sum(tiles)


def test_prompts_as_internvl_is_asked_in_vlmevalkit(tmp_path):
    """InternVL's VLMEvalKit model asks with its own prompt: several images as `Image-k: <image>` lines
    in the row's order before the text, kept as written (MMMU's `<image k>` references too); Chinese
    questions get the Chinese instruction; an MMMU question without options is asked directly and
    scored by VLMEvalKit's matching against "A. <answer> / B. Other Answers"."""
    from nativevl.eval.tasks.files import FileTask, internvl_prompt, vlmevalkit_choice

    assert internvl_prompt("What is it?", 1) == "<image>\nWhat is it?"
    assert internvl_prompt("Is <image 2> bigger?", 2) == "Image-1: <image>\nImage-2: <image>\nIs <image 2> bigger?"
    a, _ = png_b64(1)
    b, _ = png_b64(2)
    write_tsv(tmp_path / "MMMU_DEV_VAL.tsv", [
        {"index": 1, "question": "Is <image 2> bigger than <image 1>?", "A": "yes", "B": "no", "answer": "A",
         "image": str([a, b])},  # a Python list, as pandas writes one
        {"index": 2, "question": "<image 1> How many degrees?", "A": NAN, "B": NAN, "answer": "14", "image": a},
        {"index": 3, "question": "图中有几只猫？", "A": "一", "B": "两", "answer": "B", "image": a},
    ])
    task = get_task(str(tmp_path / "MMMU_DEV_VAL.tsv"))
    mc, open_, cn = task.load(None, seed=0)
    assert mc.question.startswith("Image-1: <image>\nImage-2: <image>\nIs <image 2> bigger than <image 1>?\nA. yes")
    assert mc.sources == [a, b]
    assert open_.question == "<image>\n<image 1> How many degrees?\nAnswer the question directly."
    assert cn.question.endswith("B. 两\n请直接回答选项字母。")
    # VLMEvalKit's matching: a letter among the last words, "answer is X", else the one option text held
    # by a prediction at most twice the options' length; refusals read as Z
    options = {"A": "14", "B": "Other Answers"}
    predictions = ("14", "A", "12 A", "14 B", "The answer is B", "It is 14 degrees.",
                   "a long explanation that ends by saying fourteen, i.e. 14", "Cannot determine the answer; 14",
                   "Z Z 14")
    assert [vlmevalkit_choice(p, options) for p in predictions] == ["A", "A", "A", "B", "B", "A", None, "Z", "Z"]
    assert task.metric == "mmmu" and task.score("14 degrees", open_) and not task.score("13", open_)
    assert task.score("(A)", mc) and not FileTask("plain.tsv").score("14 degrees", open_)


def test_files_are_tiled_as_internvl_tiles_them_in_vlmevalkit(tmp_path):
    """Without --max_num each image gets InternVL's VLMEvalKit setting for the file (12 for MMMU or
    ChartQA_TEST, 18 for DocVQA, 24 for InfoVQA or OCRBench, else 6; 64 at most over a question) and
    MMMU's first image is enlarged twice; --max_num N is N tiles shared by a question's images."""
    from nativevl.data.images import tiles_per_image
    from nativevl.eval.runner import _task_settings
    from nativevl.eval.tasks.files import FileTask

    caps = {name: [FileTask(name).tile_cap(n) for n in (1, 2, 10)]
            for name in ("MMMU_DEV_VAL.tsv", "DocVQA_VAL.tsv", "OCRBench.tsv", "MMBench_DEV_EN.tsv")}
    assert caps == {"MMMU_DEV_VAL.tsv": [12, 12, 6], "DocVQA_VAL.tsv": [18, 18, 6], "OCRBench.tsv": [24, 24, 6],
                    "MMBench_DEV_EN.tsv": [6, 6, 6]}
    assert [FileTask("MMBench_DEV_EN.tsv", 6).tile_cap(n) for n in (1, 2)] == [6, tiles_per_image(6, 2)]
    a, _ = png_b64(1, size=(40, 24))
    b, _ = png_b64(2, size=(30, 20))
    write_tsv(tmp_path / "MMMU_DEV_VAL.tsv", [{"index": 1, "question": "Same?", "A": "yes", "B": "no", "answer": "A",
                                               "image": json.dumps([a, b])}])
    (item,) = get_task(str(tmp_path / "MMMU_DEV_VAL.tsv")).load(None, seed=0)
    _, images = FileTask(str(tmp_path / "MMMU_DEV_VAL.tsv")).prompt(item)
    assert [im.size for im in images] == [(80, 48), (30, 20)]
    _, images = FileTask(str(tmp_path / "MMMU_DEV_VAL.tsv"), max_num=6).prompt(item)
    assert [im.size for im in images] == [(40, 24), (30, 20)]
    settings = _task_settings(str(tmp_path / "MMMU_DEV_VAL.tsv"), {}, None)
    assert settings["max_num"] == "vlmevalkit (12 per image)"


def test_rotations_of_a_question_share_one_vit_run_and_answer_as_asked_alone(tmp_path, tokenizer):
    """An MMBench question's rotations show one picture: evaluation keeps a question's rows in one batch
    where it can, tiles the picture once and runs the ViT on it once per batch; every row's answer is the
    one its prompt gets with its own copy of the tiles."""
    from test_model import make_model

    from nativevl.data.images import image_to_tiles
    from nativevl.data.processor import chat_inputs
    from nativevl.infer.generate import generate_texts

    pictures = [png_b64(20 + q, size=(96, 24) if q == 1 else (24, 24)) for q in range(3)]  # q 1: several tiles
    rows = []
    for k in range(3):  # as VLMEvalKit sorts them: the questions first, then each rotation of them all
        for q in range(3):
            opts = ["cat", "dog", "cow"][k:] + ["cat", "dog", "cow"][:k]
            rows.append({"index": q + 1 + k * 1_000_000, "question": f"Which animal is {q}?", "A": opts[0],
                         "B": opts[1], "C": opts[2], "answer": "ABC"[opts.index("dog")],
                         "image": pictures[q][0] if k == 0 else str(q + 1)})
    path = tmp_path / "MMBench_DEV_EN.tsv"
    write_tsv(path, rows)
    model = make_model()
    task = get_task(str(path), max_num=2)
    size = model.config.vision.image_size
    tiles = [image_to_tiles(Image.fromarray(p), image_size=size, max_num=2).shape[0] for _, p in pictures]
    assert tiles[1] > 1 and tiles[0] == tiles[2] == 1
    seen = []
    hook = model.vision_tower.register_forward_hook(lambda mod, args, out: seen.append(args[0].shape[0]))
    report = evaluate(model, tokenizer, [str(path)], n=None, batch_size=4, max_num=2, model_name="m")[str(path)]
    hook.remove()
    # rows in question order (q1 x3, q2 x3, q3 x3) by four: {q1, q2}, {q2, q3}, {q3}; in file order, 3 + 3 + 1
    assert seen == [tiles[0] + tiles[1], tiles[1] + tiles[2], tiles[2]]
    assert sum(seen) < 3 * sum(tiles)  # without sharing: every row's own tiles
    items = task.load(None, 0)
    order = [i for group in task.groups(items) for i in group]
    alone = [chat_inputs(tokenizer, *task.prompt(items[i]), image_size=size, image_seq_length=model.config.image_seq_length,
                         max_num=2) for i in order]
    answers = generate_texts(model, tokenizer, alone, batch_size=4, max_new_tokens=task.max_new_tokens, progress=False)
    by_index = {r["index"]: r["prediction"] for g in report["records"] for r in g["rows"]}
    assert [by_index[i] for i in order] == answers
    assert [r["index"] for g in report["records"] for r in g["rows"]] == order  # each question with its rotations


def test_the_engine_path_answers_as_plain_batches_and_encodes_each_picture_once(tmp_path, tokenizer, monkeypatch):
    """`nativevl eval --engine`: the records of plain batched generation, for a circular file (rotations
    sharing pictures, prompts of several lengths: the engine grows its cache) and a toy task, with the
    image placeholder (made the model's favourite) never generated; each picture runs through the ViT
    once in the whole run (the vision cache spans batches), and a sharded (synced) evaluation refuses it."""
    import gc
    import itertools
    import weakref

    import torch
    from test_model import make_model

    import nativevl.infer.engine as engine_module
    from nativevl.cli import main
    from nativevl.data.images import image_to_tiles

    pictures = [png_b64(30 + q, size=(96, 24) if q == 1 else (24, 24)) for q in range(3)]
    rows = [{"index": q + 1 + k * 1_000_000, "question": f"Which shape is {q}?", "A": "ab"[k], "B": "ba"[k],
             "answer": "AB"[k], "image": pictures[q][0] if k == 0 else str(q + 1)} for k in range(2) for q in range(3)]
    path = str(tmp_path / "MMBench_DEV_EN.tsv")
    write_tsv(path, rows)
    model = make_model()
    size = model.config.vision.image_size
    favourite = torch.zeros(model.config.text.vocab_size)
    favourite[model.config.image_token_id] = 1e4
    model.lm_head.register_forward_hook(lambda mod, args, out: out + favourite.to(out.dtype))
    tiles = [image_to_tiles(Image.fromarray(p), image_size=size, max_num=2).shape[0] for _, p in pictures]
    seen, sizes = [], []
    hook = model.vision_tower.register_forward_hook(lambda mod, args, out: seen.append(args[0].shape[0]))
    real, made = engine_module.Engine, []

    def engine(*a, **k):
        sizes.append(k["max_seq_len"])
        new = real(*a, **k)
        made.append(weakref.ref(new.decoder))  # the decoder holds the KV cache
        return new

    monkeypatch.setattr(engine_module, "Engine", engine)
    kw = {"n": 4, "batch_size": 3, "max_num": 2, "model_name": "m"}  # plain: q2's rotations in two batches
    plain = evaluate(model, tokenizer, [path, "shapes", "text"], **kw)  # text: questions without an image
    plain_tiles = sum(seen)
    seen.clear()
    gc.disable()  # only the evaluation's own collection may free an outgrown engine (it holds a cycle)
    try:
        fast = evaluate(model, tokenizer, [path, "shapes", "text"], engine=True, **kw)
    finally:
        gc.enable()
    hook.remove()
    for task in (path, "shapes", "text"):
        assert fast[task]["records"] == plain[task]["records"]
    assert sum(seen) == sum(tiles) + 4 < plain_tiles == sum(tiles) + tiles[1] + 4  # each picture once; 4 toy tiles
    # the 3-tile question came after a 1-tile one: a bigger cache; the toy task reused the file's engine; the
    # engines outgrown were freed (their KV caches) before the next was made
    assert len(sizes) >= 2 and all(a < b for a, b in itertools.pairwise(sizes))
    assert all(ref() is None for ref in made[:-1])
    assert all(r["prediction"] for r in plain["shapes"]["records"])  # answers of other tokens than the favourite
    with pytest.raises(ValueError, match="synced"):
        evaluate(model, tokenizer, [path], engine=True, synced=True, **kw)
    model.save_pretrained(tmp_path / "m", tokenizer=tokenizer)
    args = ["eval", "--model", str(tmp_path / "m"), "--tasks", path, "--max_num", "2", "--batch_size", "2"]
    for extra, out in (([], "plain.json"), (["--engine"], "engine.json")):
        assert main([*args, *extra, "--out", str(tmp_path / out)]) == 0
    a, b = (json.loads((tmp_path / f).read_text())[path]["records"] for f in ("plain.json", "engine.json"))
    assert a == b

def test_pixel_digests_tell_apart_what_tiles_apart():
    """The evaluation's key for a picture asked again: equal for the same pixels from other bytes, other for
    what load_image or the tiling would make differently (a clip's frame, a palette, an EXIF rotation)."""
    from nativevl.data.images import VideoClip, pixel_digest

    pixels = np.random.default_rng(3).integers(0, 255, (6, 9, 3), dtype=np.uint8)
    a = Image.fromarray(pixels)
    assert pixel_digest(a) == pixel_digest(Image.fromarray(pixels.copy())) == pixel_digest(a.convert("RGB"))
    assert pixel_digest(a) != pixel_digest(VideoClip((a,)))  # a frame is one tile whatever the cap
    assert pixel_digest(pixels) != pixel_digest(pixels[:, ::-1])
    p = a.convert("P")
    q = p.copy()
    q.putpalette([255, 0, 0] * 256)
    assert pixel_digest(p) != pixel_digest(q)  # the same indices, other colours
    jpeg = io.BytesIO()
    exif = a.getexif()
    exif[0x0112] = 6  # rotated 90 degrees when shown
    a.save(jpeg, format="JPEG", exif=exif.tobytes())
    plain = io.BytesIO()
    a.save(plain, format="JPEG")
    rotated, upright = Image.open(jpeg), Image.open(plain)
    assert np.array_equal(np.asarray(rotated), np.asarray(upright)) and pixel_digest(rotated) != pixel_digest(upright)
    assert pixel_digest("/some/file.png") is None  # not read: not compared


def test_the_engine_path_answers_a_prompt_past_the_model_positions_as_plain_generate(tokenizer):
    """With dynamic RoPE a prompt past max_position_embeddings is rescaled, which the engine's static step
    does not do: that prompt is answered by plain generate, the others by the engine, in order."""
    from test_model import make_model

    from nativevl.eval.runner import predict, predict_engine

    model = make_model()
    long = [{"role": "user", "content": "one two three " * 1500}]
    assert model.config.text.rope_type == "dynamic"
    assert len(tokenizer(long[0]["content"]).input_ids) > model.config.text.max_position_embeddings
    prompts = [([{"role": "user", "content": "hi there"}], []), (long, []), ([{"role": "user", "content": "a b"}], [])]
    kw = {"max_new_tokens": 4, "batch_size": 2, "system_message": None, "progress": False}
    assert predict_engine(model, tokenizer, prompts, **kw) == predict(model, tokenizer, prompts, **kw)
    assert predict_engine(model, tokenizer, prompts[1:2], **kw) == predict(model, tokenizer, prompts[1:2], **kw)
