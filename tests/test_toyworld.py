"""The toy world: determinism, verifiers, chance levels, the evaluation runner's scoring."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from nativevl.data.toyworld import FAMILIES, ToyWorldSource, example, final_answer, verify, write_dataset
from nativevl.eval.runner import evaluate, wilson
from nativevl.eval.tasks import get_task
from nativevl.eval.tasks.toyworld import chance_level


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_generator_is_deterministic_by_seed(family):
    a, b, other = example(family, 3, 7), example(family, 3, 7), [example(family, 4, i) for i in range(5)]
    assert (a.question, a.answer, a.caption, a.more) == (b.question, b.answer, b.caption, b.more)
    assert all(np.array_equal(x, y) for x, y in zip(a.images, b.images))
    assert any((o.question, o.answer) != (a.question, a.answer) for o in other)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_verifiers_accept_the_reference_and_reject_perturbations(family):
    for i in range(20):
        ex = example(family, 0, i)
        assert verify(family, ex.answer, ex.answer)
        assert verify(family, "  " + ex.answer.upper() + ". ", ex.answer)  # normalisation
        assert not verify(family, ex.answer + " x", ex.answer)
        assert not verify(family, "", ex.answer)
        if family == "arithmetic":
            value = int(final_answer(ex.answer))
            wrong = ex.answer.replace(f"Final answer: {value}", f"Final answer: {value + 1}")
            assert not verify(family, wrong, ex.answer)
            assert not verify(family, ex.answer.rsplit("\n\n", 1)[0], ex.answer)  # no final line
            assert verify(family, f"some other steps\n\nFinal answer: {value}", ex.answer)  # the final answer decides


def test_arithmetic_steps_are_separated_by_blank_lines():
    ex = example("arithmetic", 0, 1)
    steps = ex.answer.split("\n\n")
    assert len(steps) >= 3 and steps[-1].startswith("Final answer: ")
    digits = [int(d) for d in steps[0].removeprefix("the numbers are ").rstrip(".").replace(" and ", ", ").split(", ")]
    assert int(final_answer(ex.answer)) == sum(digits)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_chance_is_at_most_20_percent(family):
    """As the demo's report measures it (held-out seed, 2,000 questions)."""
    assert chance_level(get_task(family), seed=10_000, n=2000) <= 0.2


def test_multi_image_counts_and_prompt():
    for i in range(10):
        ex = example("multi_image", 0, i)
        n = len(ex.images)
        assert 5 <= n <= 8 and ex.question.count("<image>") == n
        assert all(f"Image-{k}: <image>" in ex.question for k in range(1, n + 1))
        colour, number = ex.answer.split()
        assert 1 <= int(number) <= n and f"the {colour} " in ex.question.splitlines()[-1]
        # every picture asked about once, with its own colour: the colours of a question differ
        answers = [ex.answer] + [a for _, a in ex.more]
        assert sorted(int(a.split()[1]) for a in answers) == list(range(1, n + 1))
        assert len({a.split()[0] for a in answers}) == n
        assert sorted(ex.caption.rstrip(".").split(", ")) == sorted(answers)  # pre-training: all, any order


def test_multi_image_picture_carries_its_number():
    """Each picture: one large object of the colour its answer names, with the picture's number drawn large
    over its middle (so that all of the picture's visual tokens hold part of both)."""
    from nativevl.data.toyworld.render import FONT, PALETTE

    ex = example("multi_image", 3, 0)
    colour_of = {int(a.split()[1]): a.split()[0] for a in [ex.answer] + [a for _, a in ex.more]}
    for k, img in enumerate(ex.images, start=1):
        rgb = img.reshape(-1, 3)
        assert (rgb == PALETTE[colour_of[k]]).all(axis=1).sum() > 2000
        dark = img.max(axis=-1) < 60
        rows, cols = dark.any(axis=1).nonzero()[0], dark.any(axis=0).nonzero()[0]
        assert dark.sum() == FONT[str(k)].sum() * 36  # the glyph at scale 6, whole
        assert 20 <= rows.min() and rows.max() < 76 and 25 <= cols.min() and cols.max() < 71


def test_multi_image_number_only_in_the_prompt(monkeypatch):
    """NUMBERED_PICTURES False (the harder form): no number drawn, the `Image-k:` labels and answers as before."""
    import nativevl.data.toyworld.tasks as tasks

    monkeypatch.setattr(tasks, "NUMBERED_PICTURES", False)
    ex = tasks.example("multi_image", 3, 0)
    assert all((img.max(axis=-1) < 60).sum() == 0 for img in ex.images)
    assert "Image-1: <image>" in ex.question and len(ex.answer.split()) == 2


def test_runner_scores_oracle_and_wrong_answers():
    tasks = sorted(FAMILIES)
    right = evaluate(None, None, tasks, n=12, seed=1, predictor=lambda task, items: [it.answer for it in items])
    wrong = evaluate(None, None, tasks, n=12, seed=1, predictor=lambda task, items: ["zzz" for _ in items])
    for t in tasks:
        assert right[t]["accuracy"] == 1.0 and right[t]["n"] == 12 and right[t]["ci95"][1] == 1.0
        assert wrong[t]["accuracy"] == 0.0 and wrong[t]["ci95"][0] == 0.0
    low, high = wilson(50, 100)
    assert abs(low - 0.404) < 0.01 and abs(high - 0.596) < 0.01


def test_sources_and_files(tmp_path, tokenizer):
    from nativevl.data.pipeline import FileSource
    from nativevl.data.records import load_meta

    src = ToyWorldSource("shapes", "sft", seed=2, turns=3)
    rec = src.get(0)
    assert len(rec.images) == 1 and len(rec.conversations) == 6
    assert ToyWorldSource("text", "pretrain", seed=2).get(0).text
    meta = write_dataset(tmp_path, ["shapes", "text", "multi_image"], "pretrain", seed=2, n_per_family=3)
    specs = load_meta(meta)
    assert [s.name for s in specs] == ["shapes", "text", "multi_image"]
    files = [FileSource(s) for s in specs]
    assert files[1].is_text_only() and not files[0].is_text_only()
    assert files[2].get(0).images and files[0].get(0).conversations[0]["value"] == "<image>\ndescribe the image."


def test_runner_refuses_an_empty_evaluation():
    """n = 0 is a usage error named as such (it was a ZeroDivisionError after the model had been loaded)."""
    with pytest.raises(ValueError, match="n must be >= 1"):
        evaluate(None, None, ["shapes"], n=0, predictor=lambda task, items: [it.answer for it in items])
    from nativevl.eval.runner import evaluate_best_of_n

    with pytest.raises(ValueError, match="n must be >= 1"):
        evaluate_best_of_n(None, None, ["shapes"], n=0)


def _sharded_eval(rank: int, out: str) -> None:
    def answer(task, items):  # rank 0 answers its items right, rank 1 wrong: the report counts both ranks' items
        return [it.answer if rank == 0 else "zzz" for it in items]

    report = evaluate(None, None, ["shapes", "text"], n=9, seed=1, rank=rank, world_size=2, predictor=answer)
    Path(out, f"rank{rank}.json").write_text(json.dumps(report))


def test_runner_sums_the_ranks_of_a_sharded_evaluation(tmp_path):
    from conftest import run_two_ranks

    run_two_ranks(_sharded_eval, str(tmp_path))
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for task in ("shapes", "text"):
        assert [r[task]["correct"] for r in reports] == [5, 5]  # items 0, 2, 4, 6, 8 of 9, on both ranks
        assert [r[task]["n"] for r in reports] == [9, 9]
        # every rank holds every question's record, in question order
        for r in reports:
            assert [x["index"] for x in r[task]["records"]] == list(range(9))
            assert [x["correct"] for x in r[task]["records"]] == [i % 2 == 0 for i in range(9)]


def test_paired_test_and_compare_reports(tmp_path, capsys):
    """Per-question records let two evaluations be compared on the same questions (exact McNemar)."""
    from nativevl.cli import main
    from nativevl.eval.runner import compare, paired_test

    t = paired_test([False] * 6 + [True] * 4, [True] * 6 + [True] * 4)  # 6 discordant, all for b
    assert (t["a_only"], t["b_only"], t["p_value"], t["difference"]) == (0, 6, 2 / 64, 0.6)
    t = paired_test([True] + [False] * 9 + [True] * 5, [False] + [True] * 9 + [False] * 5)
    assert (t["a_only"], t["b_only"]) == (6, 9) and t["p_value"] == pytest.approx(2 * sum(
        __import__("math").comb(15, i) for i in range(7)) / 2**15)
    assert paired_test([True, False], [True, False])["p_value"] == 1.0
    with pytest.raises(ValueError, match="same questions"):
        paired_test([True], [True, False])

    def some_wrong(task, items):  # questions 1, 4, 7, ... answered wrong
        return [it.answer if i % 3 != 1 else "zzz" for i, it in enumerate(items)]

    right = evaluate(None, None, ["shapes"], n=30, seed=1, predictor=lambda task, items: [it.answer for it in items])
    worse = evaluate(None, None, ["shapes"], n=30, seed=1, predictor=some_wrong)
    t = compare(right, worse, "shapes")
    assert (t["a_only"], t["b_only"], t["difference"]) == (10, 0, -10 / 30) and t["p_value"] == 2 / 2**10
    other = evaluate(None, None, ["shapes"], n=30, seed=2, predictor=some_wrong)
    with pytest.raises(ValueError, match="different 'shapes' questions"):
        compare(right, other, "shapes")
    # short answers can repeat across seeds: the questions' fingerprints tell them apart
    colours = [evaluate(None, None, ["charts"], n=4, seed=seed, predictor=some_wrong) for seed in (1, 106)]
    same_answers = [[r["answer"] for r in c["charts"]["records"]] for c in colours]
    for c in colours:
        c["charts"].pop("settings")
    assert same_answers[0] == same_answers[1]  # seeds 1 and 106 happen to give the same 4 answers
    with pytest.raises(ValueError, match="different 'charts' questions"):
        compare(*colours, "charts")
    old = {"shapes": {k: v for k, v in right["shapes"].items() if k != "records"}}
    with pytest.raises(ValueError, match="no per-question records"):
        compare(old, worse, "shapes")
    (tmp_path / "a.json").write_text(json.dumps(right))
    (tmp_path / "b.json").write_text(json.dumps(worse))
    assert main(["compare", str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == 0
    row = capsys.readouterr().out.strip().splitlines()[-1]
    assert row.startswith("| shapes | 1.000 | 0.667 | -0.333 | 10 | 0 | 0.00195")
    # REPORT:METHOD, with a ':' in the report's own path
    (tmp_path / "run:1").mkdir()
    (tmp_path / "run:1" / "a.json").write_text(json.dumps(right))
    assert main(["compare", f"{tmp_path}/run:1/a.json:correct", str(tmp_path / "b.json")]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == row
