"""MPO losses against TRL's DPOTrainer formulas, preference packing that shares image tiles, the MPO
stage of the loop (exact resume with the reward shift), PRM scoring in one forward, preference pairs."""

from __future__ import annotations

import ast
import itertools
import json
import logging
import math
from importlib.util import find_spec
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from nativevl import VisionLanguageModel
from nativevl.data.packing import Sample, collate
from nativevl.data.template import IGNORE_INDEX, render_chat
from nativevl.infer.prm import GOOD, encode_for_scoring, label_token_ids, prm_conversation, split_steps, step_scores
from nativevl.pipelines.preference import correctness_pairs
from nativevl.recipes import apply_overrides, launch, recipe
from nativevl.train.losses import MPOWeights, RewardShift, bco_pair, dpo_sigmoid, mpo_loss, sequence_logps
from tests.conftest import tiny_config


def trl_dpo_loss():
    """TRL 0.28's DPOTrainer.dpo_loss, the last release whose bco_pair keeps InternVL's reward shift.

    Its module cannot be imported next to transformers 5.x (trl.trainer.callbacks reads a version
    tuple as a bool and imports the absent `weave`), so the method's own source is taken from the
    installed file and run against TRL's own helpers.
    """
    from trl.trainer.dpo_config import FDivergenceConstants, FDivergenceType
    from trl.trainer.utils import cap_exp

    path = Path(find_spec("trl").origin).parent / "trainer" / "dpo_trainer.py"
    tree = ast.parse(path.read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "DPOTrainer")
    fn = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "dpo_loss")
    fn.decorator_list = []
    namespace = {"torch": torch, "F": F, "FDivergenceType": FDivergenceType, "cap_exp": cap_exp,
                 "FDivergenceConstants": FDivergenceConstants, "Optional": None, "Union": None}
    exec(compile(ast.Module(body=[fn], type_ignores=[]), str(path), "exec"), namespace)  # noqa: S102 (TRL's own code)
    return namespace["dpo_loss"]


@pytest.fixture(scope="module")
def trl():
    pytest.importorskip("trl")
    from trl.trainer.utils import RunningMoments

    accelerator = SimpleNamespace(device=torch.device("cpu"), use_distributed=False)
    trainer = SimpleNamespace(accelerator=accelerator, beta=0.1, label_smoothing=0.0, reference_free=False,
                              f_divergence_type="reverse_kl", f_divergence_params={}, loss_type=["sigmoid"],
                              running=RunningMoments(accelerator), use_weighting=False)
    from trl.trainer.dpo_config import FDivergenceType

    trainer.f_divergence_type = FDivergenceType.REVERSE_KL
    return trainer, trl_dpo_loss()


def random_logps(g, n=16):
    return [-(torch.rand(n, generator=g, dtype=torch.float64) * 40 + 1) for _ in range(4)]


def test_dpo_and_bco_equal_trl_formulas(trl):
    trainer, dpo_loss = trl
    g = torch.Generator().manual_seed(0)
    shift = RewardShift()
    for _ in range(5):  # several batches: the reward shift is a running mean over them
        pc, pr, rc, rr = random_logps(g)
        want, _, _ = dpo_loss(trainer, pc, pr, rc, rr, loss_type="sigmoid")
        torch.testing.assert_close(dpo_sigmoid(pc - rc, pr - rr, 0.1), want, rtol=1e-12, atol=1e-12)
        want_bco, _, _ = dpo_loss(trainer, pc, pr, rc, rr, loss_type="bco_pair")
        delta = shift.update(float(0.1 * torch.cat([pc - rc, pr - rr]).mean()))
        assert delta == pytest.approx(trainer.running.mean, rel=1e-6)  # TRL keeps float32 moments
        torch.testing.assert_close(bco_pair(pc - rc, pr - rr, 0.1, delta), want_bco, rtol=1e-6, atol=1e-7)


def test_sft_term_and_mpo_total(trl):
    trainer, dpo_loss = trl
    g = torch.Generator().manual_seed(1)
    # TRL's sft term is its model output's nll_loss: the token-mean cross-entropy over chosen responses
    hidden, weight = torch.randn(2, 9, 8, generator=g), torch.randn(20, 8, generator=g)
    labels = torch.randint(0, 20, (2, 9), generator=g)
    labels[0, :3] = labels[1, :5] = IGNORE_INDEX
    nll = F.cross_entropy((hidden @ weight.t()).reshape(-1, 20), labels.reshape(-1), ignore_index=IGNORE_INDEX)
    pc, pr, rc, rr = random_logps(g, 2)
    want_sft, _, _ = dpo_loss(trainer, pc, pr, rc, rr, loss_type="sft", model_output={"nll_loss": nll})
    cu = torch.tensor([0, 9, 18])
    per_doc = sequence_logps(hidden.reshape(18, 8), weight, labels.reshape(-1), cu)
    assert float(-per_doc.sum() / (labels != IGNORE_INDEX).sum()) == pytest.approx(float(want_sft.mean()), rel=1e-5)
    # MPO = 0.8 sigmoid + 0.2 bco_pair + 1.0 sft, each averaged over the batch (InternVL's trainer)
    weights = MPOWeights()
    total, parts = mpo_loss(pc - rc, pr - rr, nll, delta=0.3, weights=weights)
    trainer.running.mean = 0.3
    sig = dpo_loss(trainer, pc, pr, rc, rr, loss_type="sigmoid")[0].mean()
    bco = -F.logsigmoid(0.1 * (pc - rc) - 0.3) - F.logsigmoid(-(0.1 * (pr - rr) - 0.3))
    assert float(total) == pytest.approx(float(0.8 * sig + 0.2 * bco.mean() + 1.0 * nll), rel=1e-9)
    assert float(parts["dpo"]) == pytest.approx(float(sig), rel=1e-9)


def test_sequence_logps_sums_each_documents_labelled_tokens():
    g = torch.Generator().manual_seed(2)
    hidden, weight = torch.randn(12, 6, generator=g), torch.randn(30, 6, generator=g)
    labels = torch.randint(0, 30, (12,), generator=g)
    labels[[0, 1, 5, 6, 11]] = IGNORE_INDEX
    cu = torch.tensor([0, 5, 9, 12])
    logp = torch.log_softmax(hidden @ weight.t(), -1)
    want = [sum(float(logp[t, labels[t]]) for t in range(a, b) if labels[t] != IGNORE_INDEX)
            for a, b in itertools.pairwise(cu.tolist())]
    got = sequence_logps(hidden, weight, labels, cu, chunk_size=3)
    torch.testing.assert_close(got, torch.tensor(want), rtol=1e-5, atol=1e-5)


def pair_sample(cfg, g, n_tiles=1):
    n = cfg.image_seq_length
    doc = lambda k: np.concatenate([[7], np.full(n * n_tiles, cfg.image_token_id), np.random.default_rng(k).integers(10, 200, 6)])
    chosen, rejected = doc(1), doc(2)[:-2]
    lab = lambda ids: np.where(np.arange(len(ids)) >= len(ids) - 4, ids, IGNORE_INDEX)
    pos = lambda ids: np.arange(len(ids), dtype=np.float32)
    pixels = torch.randn(n_tiles, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g)
    return Sample(chosen, lab(chosen), pos(chosen), pixels, "pair", 0, rejected=(rejected, lab(rejected), pos(rejected)))


def test_pair_shares_tiles_and_equals_separate_documents():
    cfg = tiny_config()
    torch.manual_seed(0)
    model = VisionLanguageModel(cfg).eval()
    g = torch.Generator().manual_seed(3)
    plain = Sample(np.array([7, 8, 9, 10]), np.array([IGNORE_INDEX, 8, 9, 10]), np.arange(4, dtype=np.float32))
    batch = collate([pair_sample(cfg, g, 2), plain, pair_sample(cfg, g, 1)], "token")
    assert batch.num_documents == 5 and batch.pairs.tolist() == [[0, 1], [3, 4]]
    assert batch.pixel_values.shape[0] == 3  # each pair's tiles once
    assert batch.tile_index.tolist() == [0, 1, 0, 1, 2, 2]
    # only the chosen documents carry loss weight (MPO's NLL); both keep labels for the log-probs
    docs = [slice(a, b) for a, b in zip(batch.cu_seqlens[:-1].tolist(), batch.cu_seqlens[1:].tolist(), strict=True)]
    assert batch.loss_weights[docs[1]].sum() == 0 and batch.loss_weights[docs[0]].sum() > 0
    assert (batch.labels[docs[1]] != IGNORE_INDEX).sum() > 0
    with torch.no_grad():
        shared = model(**batch.model_inputs()).logits
        repeated = model(batch.input_ids, batch.pixel_values[batch.tile_index], cu_seqlens=batch.cu_seqlens,
                         position_ids=batch.position_ids).logits
    torch.testing.assert_close(shared, repeated)
    # preference records met by the plain objective are named: the pairs' own records, not the batch's first
    from dataclasses import replace

    from nativevl.train.objectives import make_objective

    named = collate([replace(plain, source="plain:1"), replace(pair_sample(cfg, g, 1), source="pref:7"),
                     replace(plain, source="plain:2"), replace(pair_sample(cfg, g, 1), source="pref:9")], "token")
    with pytest.raises(ValueError, match=r"preference records \(\['pref:7', 'pref:9'\]\) need --objective=mpo"):
        make_objective("lm", model, 64).local_normalizers([named])


def preference_meta(folder: Path, n: int = 12) -> Path:
    rng = np.random.default_rng(0)
    lines = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (56, 56, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        lines.append({"image": f"{i}.png", "question": "<image>\nwhat is shown in the image?",
                      "chosen": "a red circle", "rejected": "a blue square and a green triangle"})
    (folder / "pref.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    meta = {"pref": {"root": str(folder), "annotation": "pref.jsonl", "max_dynamic_patch": 1}}
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder / "meta.json"


def metrics(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


MPO_ARGS = ["--objective=mpo", "--loss_reduction=token", "--global_batch=2", "--tensorboard=false", "--max_tokens=256",
            "--lr=3e-3", "--save_every=1", "--export=false"]


def test_mpo_stage_trains_and_resumes_exactly(tmp_path):
    meta = preference_meta(tmp_path)
    args = [*MPO_ARGS, f"--meta={meta}"]
    full = tmp_path / "full"
    # validated every 2 steps (on the same records): the losses and reward shift below are those of the
    # runs without validation, so validating neither trains nor moves the shift
    launch(apply_overrides(recipe("debug_tiny"), [*args, "--max_steps=4", f"--val_meta={meta}", "--val_every=2",
                                                  "--val_records=6"]), full)
    steps = [m for m in metrics(full) if "loss" in m]
    val = [m for m in metrics(full) if "val_loss" in m]
    assert [m["step"] for m in val] == [2, 4] and all(m["val_reward_accuracy"] >= 0 for m in val)
    assert val[0]["val_dpo"] < math.log(2)  # after 2 steps the policy has moved from the reference
    # step 1: the policy is the reference, so every log-ratio is 0: DPO = log 2, BCO = 2 log 2 (shift 0)
    assert steps[0]["dpo"] == pytest.approx(math.log(2), abs=1e-5)
    assert steps[0]["bco"] == pytest.approx(2 * math.log(2), abs=1e-5)
    assert steps[0]["loss"] == pytest.approx(0.8 * math.log(2) + 0.2 * 2 * math.log(2) + steps[0]["nll"], rel=1e-5)
    assert steps[-1]["reward_margin"] > 0 and steps[-1]["dpo"] < math.log(2)  # it learns to prefer the chosen
    assert steps[-1]["reward_shift"] != 0
    part = tmp_path / "part"
    launch(apply_overrides(recipe("debug_tiny"), [*args, "--max_steps=2"]), part)
    launch(apply_overrides(recipe("debug_tiny"), [*args, "--max_steps=4"]), part)
    resumed = {m["step"]: m for m in metrics(part)}
    for m in steps:
        assert resumed[m["step"]]["loss"] == m["loss"]
        assert resumed[m["step"]]["reward_shift"] == m["reward_shift"]


def test_mpo_refuses_conversation_data(tmp_path):
    run = apply_overrides(recipe("debug_tiny"), ["--objective=mpo", "--max_steps=1", "--tensorboard=false", "--export=false"])
    with pytest.raises(ValueError, match="preference records"):
        launch(run, tmp_path)


def test_correctness_pairs_are_distinct_and_bounded():
    rng = np.random.default_rng(0)
    responses = ["a", "b", "a", "c", "d", "e"]
    correct = [True, False, True, True, False, False]
    pairs = correctness_pairs(responses, correct, max_pairs=4, rng=rng)
    assert len(pairs) == 4 and len(set(pairs)) == 4
    assert all(c in ("a", "c") and r in ("b", "d", "e") for c, r in pairs)
    assert correctness_pairs(["a", "b"], [True, True], 15, rng) == []


def test_split_steps_merges_evenly():
    assert split_steps("a\n\nb\n\n\n\nc") == ["a", "b", "c"]
    merged = split_steps("\n\n".join(str(i) for i in range(10)), max_steps=4)
    assert len(merged) == 4 and "\n\n".join(merged) == "\n\n".join(str(i) for i in range(10))


def test_prm_scores_in_one_forward_equal_step_by_step(tokenizer):
    cfg = tiny_config()
    torch.manual_seed(0)
    model = VisionLanguageModel(cfg).eval()
    question = "<image>\nwhat is shown?"
    responses = ["a red circle\n\ntwo three\n\nthe cat", "one\n\nfive six seven eight nine ten"]
    pixels = torch.randn(1, 3, cfg.vision.image_size, cfg.vision.image_size)
    batched = step_scores(model, tokenizer, question, responses, pixels, batch_size=2)
    good, bad = label_token_ids(tokenizer)
    for response, scores in zip(responses, batched, strict=True):
        steps = split_steps(response)
        assert len(scores) == len(steps)
        for k in range(len(steps)):
            ids, slots = encode_for_scoring(tokenizer, question, steps[: k + 1], [1], cfg.image_seq_length)
            logits = model(torch.tensor([ids]), pixels).logits[0, slots[-1]]
            want = logits[[good, bad]].softmax(-1)[0]
            assert scores[k] == pytest.approx(float(want), abs=1e-5)
    conv = prm_conversation(question, ["x", "y"], ["+", "-"])
    assert [t["value"] for t in conv if t["from"] == "gpt"] == [GOOD, "-"]
    # a sample that emitted image markup cannot be a PRM turn: it scores 0, the others as before
    mixed = step_scores(model, tokenizer, question, [responses[0], "see <image>\n\nthere", responses[1]], pixels)
    assert mixed[1] == [0.0]
    assert [mixed[0], mixed[2]] == [pytest.approx(s, abs=1e-5) for s in batched]


def test_best_of_n_prefills_once_and_picks_by_score(tokenizer):
    from nativevl.infer.best_of_n import Candidates, best_of_n
    from nativevl.infer.engine import Engine

    cfg = tiny_config()
    torch.manual_seed(0)
    model = VisionLanguageModel(cfg).eval()
    engine = Engine(model, tokenizer, max_batch_size=8, max_seq_len=128)
    ids = tokenizer("<|im_start|>user\nwhat is shown?<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False).input_ids
    best, cands = best_of_n(engine, model, tokenizer, "what is shown?", ids, None, n=6, max_tokens=8, seed=1)
    assert engine.stats["prefills"] == 1 and len(cands.texts) == 6
    assert len(set(cands.texts)) > 1  # sampled, not six copies of the greedy answer
    means = [sum(s) / len(s) for s in cands.step_scores]
    assert best == cands.texts[max(range(6), key=lambda i: (means[i], -i))]
    # a question with two images: the PRM places each image's tiles at its own placeholder
    two = "Image-1: <image>\nImage-2: <image>\nwhich is red?"
    pixels = torch.randn(3, 3, cfg.vision.image_size, cfg.vision.image_size)
    prompt = tokenizer(render_chat([{"role": "user", "content": two}], tiles_per_image=[2, 1], system_message=None,
                                   image_seq_length=cfg.image_seq_length), add_special_tokens=False).input_ids
    _, cands = best_of_n(engine, model, tokenizer, two, prompt, pixels, n=3, max_tokens=6, seed=2,
                         tiles_per_image=[2, 1])
    assert cands.step_scores == [pytest.approx(s, abs=1e-5)
                                 for s in step_scores(model, tokenizer, two, cands.texts, pixels, [2, 1])]
    _, derived = best_of_n(engine, model, tokenizer, two, prompt, pixels, n=3, max_tokens=6, seed=2)  # from the prompt
    assert derived.texts == cands.texts and derived.step_scores == cands.step_scores
    import nativevl.infer.best_of_n as bon

    seen = []
    real = bon.step_scores
    bon.step_scores = lambda *a, **k: seen.append(k["max_steps"]) or real(*a, **k)
    try:
        best_of_n(engine, model, tokenizer, two, prompt, pixels, n=2, max_tokens=6, seed=2, prm_max_steps=3)
    finally:
        bon.step_scores = real
    assert seen == [3]  # the PRM splits steps as its data did
    votes = Candidates(["x\n\nFinal answer: 3", "Final answer: 4", "y\n\nFinal answer: 4", "Final answer: 3"])
    assert votes.pick("majority") == 0  # a tie goes to the earliest candidate's answer
    scored = Candidates(["a", "b", "c"], step_scores=[[0.9, 0.1], [0.6, 0.6], [0.1, 0.95]])
    assert scored.pick("prm") == 1 and scored.pick("outcome") == 2


def test_prm_step_lm_learns_the_steps_that_are_right_so_far(tokenizer):
    from nativevl.data.pipeline import DataConfig
    from nativevl.data.records import Record
    from nativevl.data.samples import build_sample

    conv = prm_conversation("what is shown?", ["one", "two", "three"], ["+", "+", "-"])
    record = Record(conversations=conv, source="prm")
    base = build_sample(record, tokenizer, DataConfig(image_token_id=5, system_message=None, prm_placeholder="+"))
    cfg = DataConfig(image_token_id=5, system_message=None, prm_placeholder="+", prm_step_lm=0.25)
    sample = build_sample(record, tokenizer, cfg)
    assert (sample.input_ids == base.input_ids).all()  # the input is the same, placeholders included
    labelled = sample.labels != IGNORE_INDEX
    text = tokenizer.decode(sample.input_ids[labelled & (base.labels == IGNORE_INDEX)])
    assert "one" in text and "two" in text and "three" not in text  # the third step is the error
    assert "### Question" in text  # the first user turn (question and first step) is right so far
    old = base.labels != IGNORE_INDEX
    assert (sample.labels[old] == base.labels[old]).all() and (sample.label_weights[old] == 1).all()
    assert np.allclose(sample.label_weights[labelled & ~old], 0.25)
    # collate applies the multiplier: an added target weighs 0.25 of a label token
    batch = collate([sample], "token")
    w = batch.loss_weights.numpy()
    targets = np.concatenate([sample.labels[1:], [IGNORE_INDEX]])
    assert set(np.round(w[targets != IGNORE_INDEX], 6)) == {0.25, 1.0}
    plain = collate([base], "token").loss_weights.numpy()
    assert (w[plain > 0] == 1).all()
    with pytest.raises(ValueError, match="set prm_placeholder"):
        DataConfig(prm_step_lm=0.5)
    # a solution wrong from its first step learns no step text
    wrong = build_sample(Record(conversations=prm_conversation("q?", ["a", "b"], ["-", "-"]), source="p"), tokenizer, cfg)
    assert ((wrong.labels != IGNORE_INDEX) == (wrong.label_weights == 1)).all()


def test_prm_training_shows_placeholders_and_learns_true_labels(tokenizer):
    from nativevl.data.pipeline import DataConfig
    from nativevl.data.records import Record
    from nativevl.data.samples import build_sample

    conv = prm_conversation("what is shown?", ["one", "two", "three"], ["+", "-", "-"])
    record = Record(conversations=conv, source="prm")
    cfg = DataConfig(image_token_id=5, system_message=None, prm_placeholder="+")
    plain = build_sample(record, tokenizer, DataConfig(image_token_id=5, system_message=None))
    sample = build_sample(record, tokenizer, cfg)
    good, bad = label_token_ids(tokenizer)
    slots = np.flatnonzero(np.isin(plain.labels, [good, bad]))
    assert plain.input_ids[slots].tolist() == [good, bad, bad]  # without the option the labels are in context
    assert sample.input_ids[slots].tolist() == [good, good, good]  # with it: '+' as when scoring ...
    assert sample.labels[slots].tolist() == [good, bad, bad]  # ... and the true labels as targets
    other = np.setdiff1d(np.arange(len(plain.input_ids)), slots)
    assert (sample.input_ids[other] == plain.input_ids[other]).all()


def test_preference_pipeline_never_writes_empty_responses(tmp_path, monkeypatch):
    """A sampled response that is empty or only whitespace (the model ended at once) cannot be a chosen
    or rejected side: the MPO loader rejects such records, so the pipeline must drop them."""
    from nativevl.data.records import DatasetSpec, parse_record
    from nativevl.pipelines import preference
    from nativevl.pipelines.questions import Question

    def fake_sampler(model, tokenizer, prompts, n, **kw):
        if kw.get("desc") == "dropout-ntp":  # nothing more after a whitespace-only cut
            return [["" if not prefix.strip() else " went on"] for _, _, prefix in prompts]
        return [["Final answer: 4", "", "Final answer: 5", "  \n"], ["", "", "", "a cat"], ["", " ", "", ""],
                ["", "", "", " y"]]

    monkeypatch.setattr(preference, "sample_responses", fake_sampler)
    questions = [Question("what is 2+2?", [], "Final answer: 4"), Question("describe", [], None),
                 Question("what is 1+1?", [], "Final answer: 2"), Question("look", [], None)]
    out = tmp_path / "pref.jsonl"
    stats = preference.build_preference_data(None, None, questions, preference.PreferenceConfig(n=4), out)
    spec = DatasetSpec("pref", out, tmp_path)
    records = [json.loads(x) for x in out.read_text().splitlines()]
    for i, rec in enumerate(records):
        parse_record(rec, spec, f"line {i + 1}")  # a RecordError here: the loader would reject the pair
    assert [(r["chosen"], r["rejected"]) for r in records] == [("Final answer: 4", "Final answer: 5"),
                                                               ("a cat", "a  went on")]
    assert stats["pairs"] == 2 and stats["dropped_responses"] == 2 + 3 + 4 + 3


def test_jsonl_questions_keep_unicode_line_separators(tmp_path):
    """JSON written with ensure_ascii=False holds U+2028 / U+0085 raw inside strings; only '\\n' ends a
    jsonl record (str.splitlines also splits on those and broke the record). A bad line is named."""
    from nativevl.pipelines.questions import jsonl_questions

    Image.new("RGB", (20, 20)).save(tmp_path / "a.png")
    rec = {"image": "a.png", "conversations": [{"from": "human", "value": "<image>\nwhat\u2028is this\u0085?"},
                                               {"from": "gpt", "value": "a black square"}]}
    (tmp_path / "q.jsonl").write_text(json.dumps(rec, ensure_ascii=False) + "\n\n", encoding="utf-8")
    (q,) = jsonl_questions(tmp_path / "q.jsonl")
    assert q.question == "<image>\nwhat\u2028is this\u0085?" and q.answer == "a black square" and len(q.images) == 1
    (tmp_path / "bad.jsonl").write_text(json.dumps(rec) + "\n{not json\n", encoding="utf-8")
    with pytest.raises(ValueError, match="bad.jsonl:2: not valid JSON"):
        jsonl_questions(tmp_path / "bad.jsonl")


def test_jsonl_questions_pair_the_first_question_with_its_own_answer(tmp_path, caplog):
    """A multi-turn record's ground truth is the answer to the question asked (the turn after it), not the
    record's last answer; dropped later exchanges and ignored system turns are counted in the log."""
    from nativevl.pipelines.questions import jsonl_questions

    Image.new("RGB", (20, 20)).save(tmp_path / "a.png")
    multi = {"image": "a.png", "conversations": [
        {"from": "system", "value": "be brief"},
        {"from": "human", "value": "<image>\nwhat is this?"}, {"from": "gpt", "value": "a square"},
        {"from": "human", "value": "what colour is it?"}, {"from": "gpt", "value": "black"}]}
    open_question = {"image": "a.png", "conversations": [{"from": "human", "value": "<image>\nwhat is this?"}]}
    (tmp_path / "q.jsonl").write_text(json.dumps(multi) + "\n" + json.dumps(open_question) + "\n")
    with caplog.at_level("WARNING"):
        first, second = jsonl_questions(tmp_path / "q.jsonl")
    assert (first.question, first.answer) == ("<image>\nwhat is this?", "a square")
    assert (second.question, second.answer) == ("<image>\nwhat is this?", None)
    assert "1 of 2 records have more than one question" in caplog.text
    assert "1 of 2 records carry a system turn" in caplog.text


def test_jsonl_questions_read_records_as_the_loader_does(tmp_path):
    """The question reader takes what the training loader takes: 'images' lists and user/assistant (or
    role/content) turns; a placeholder count that does not match the images is named with its line."""
    from nativevl.pipelines.questions import jsonl_questions

    Image.new("RGB", (20, 20)).save(tmp_path / "a.png")
    recs = [{"images": ["a.png", "a.png"], "conversations": [{"from": "human", "value": "which is brighter?"},
                                                             {"from": "gpt", "value": "neither"}]},
            {"image": None, "images": "a.png", "conversations": [{"role": "user", "content": "<image>\nwhat is it?"},
                                                                 {"role": "assistant", "content": "a square"}]}]
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    a, b = jsonl_questions(tmp_path / "q.jsonl")
    assert len(a.images) == 2 and a.answer == "neither"
    assert len(b.images) == 1 and b.question == "<image>\nwhat is it?" and b.answer == "a square"
    bad = {"image": "a.png", "conversations": [{"from": "human", "value": "<image> or <image>?"}]}
    (tmp_path / "bad.jsonl").write_text(json.dumps(recs[0]) + "\n" + json.dumps(bad) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match="bad.jsonl:2: 2 <image> placeholder.*1 image"):
        jsonl_questions(tmp_path / "bad.jsonl")


def test_jsonl_questions_read_only_the_first_limit_records(tmp_path, capsys):
    """`nativevl data preference --input FILE --n 2` loads two questions' images, not the whole file's:
    a record past the limit whose image is missing is never opened."""
    from nativevl.pipelines.questions import jsonl_questions

    Image.new("RGB", (20, 20)).save(tmp_path / "a.png")
    good = {"image": "a.png", "conversations": [{"from": "human", "value": "<image>\nwhat is it?"}]}
    gone = {"image": "missing.png", "conversations": [{"from": "human", "value": "<image>\nand this?"}]}
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (good, good, gone)), encoding="utf-8")
    assert len(jsonl_questions(tmp_path / "q.jsonl", limit=2)) == 2
    with pytest.raises(ValueError, match="1 of 3 records name images that cannot be read"):
        jsonl_questions(tmp_path / "q.jsonl")
    # a file with fewer records than --n: all of them, and the command says so
    from nativevl.cli_data import _questions

    (tmp_path / "two.jsonl").write_text("".join(json.dumps(good) + "\n" for _ in range(2)), encoding="utf-8")
    args = SimpleNamespace(toyworld=None, input=str(tmp_path / "two.jsonl"), root=None, n=1000, seed=0)
    assert len(_questions(args)) == 2
    assert "2 question(s), fewer than --n 1000" in capsys.readouterr().err


def test_majority_vote_groups_answers_as_the_verifier_reads_them():
    """A candidate with no 'Final answer:' line is not the same answer as one whose final answer equals
    its text: the arithmetic verifier marks it wrong. Voting merged '4' with 'Final answer: 4', so the
    earliest of the group ('4', wrong) was picked although the majority's final answer (4) is right."""
    from nativevl.data.toyworld.tasks import verify
    from nativevl.infer.best_of_n import Candidates

    texts = ["4", "x\n\nFinal answer: 4", "Final answer: 4", "Final answer: 5", "Final answer: 5"]
    pick = Candidates(texts).pick("majority")
    assert pick == 1 and verify("arithmetic", texts[pick], "Final answer: 4")
    # the other way round (a whole-text task): 'Final answer: circle' is not the answer 'circle'
    texts = ["Final answer: circle", "circle", "circle", "square", "square"]
    pick = Candidates(texts).pick("majority")
    assert pick == 1 and verify("shapes", texts[pick], "circle")
    # empty or unread samples have no vote (three empty ones out-voted two B's)
    assert Candidates(["", "B", " ", "B", "A", ""]).pick("majority") == 1
    assert Candidates(["", " "]).pick("majority") == 0
    # the evaluation's toy tasks vote by what their verifier compares: two identical samples cut short
    # (no final answer, always scored wrong) out-voted the readable answers 12 and 13
    from nativevl.eval.tasks.toyworld import ToyWorldTask

    cut = "3 + 4 = 7\n\n7 + 4 = 7 + 4 = 7 + 4"
    texts = [cut, cut, "3 + 4 = 7\n\n7 + 5 = 12\n\nFinal answer: 12", "7 + 5 = 13\n\nFinal answer: 13"]
    task = ToyWorldTask("arithmetic")
    assert Candidates(texts).pick("majority") == 0  # a task-less vote cannot tell a cut sample from an answer
    assert Candidates(texts, vote_key=lambda t: task.vote_key(t, None)).pick("majority") == 2
    shapes = ToyWorldTask("shapes")
    votes = ["Final answer: circle", "circle", " Circle ", "square", ""]
    assert Candidates(votes, vote_key=lambda t: shapes.vote_key(t, None)).pick("majority") == 1


def test_alignment_summary_refuses_an_mpo_best_of_n_report_on_other_questions():
    """The MPO policy's Best-of-N figures sit in the same table as the others, so they must come from
    the same questions (n) and sampling (seed, temperature); a mismatch was written without a word."""
    from nativevl.eval.alignment import summarize

    def scored(n):
        return {"accuracy": 0.5, "ci95": [0.1, 0.9], "n": n, "correct": n // 2}

    def bon(n, seed=10_000, temperature=0.7):
        return {"arithmetic": {"samples": 8, "pass1": scored(n), "majority8": scored(n), "prm_best8": scored(n),
                               "outcome_best8": scored(n), "oracle8": scored(n), "sample_mean": {"accuracy": 0.4, "n": n},
                               "seed": seed, "temperature": temperature}}

    ev = {"arithmetic": {**scored(20), "chance": 0.1}}
    out = summarize(ev, ev, bon(20), bon(20))
    assert out["mpo_prm_best8"]["n"] == 20 and out["n"] == 20
    for other in (bon(10), bon(20, seed=1), bon(20, temperature=1.0)):
        with pytest.raises(ValueError):
            summarize(ev, ev, bon(20), other)


def test_prm_objective_is_a_two_way_choice_at_the_label_slots_only(tokenizer):
    """--objective=prm: at each label slot the cross-entropy between '+' and '-' only (what scoring reads);
    the other labelled tokens (`<|im_end|>`, step text) keep the full-vocabulary loss; one normaliser.
    A '+' inside step text is not a slot."""
    from nativevl.data.pipeline import DataConfig
    from nativevl.data.records import Record
    from nativevl.data.samples import build_sample
    from nativevl.train.objectives import make_objective

    good, bad = label_token_ids(tokenizer)
    cfg = DataConfig(image_token_id=5, system_message=None, prm_placeholder="+", prm_step_lm=0.5)
    samples = [build_sample(Record(conversations=prm_conversation(q, steps, labels), source=f"p{i}"), tokenizer, cfg)
               for i, (q, steps, labels) in enumerate([("what is 2+3?", ["2+3", "= 5"], ["+", "+"]),
                                                       ("what is 1+1?", ["1 +1 = 3", "Final answer: 3"], ["-", "-"])])]
    batch = collate(samples, "token")
    slots = batch.label_slots.numpy()
    assert slots.sum() == 4 and set(batch.labels.numpy()[slots].tolist()) == {good, bad}
    step_plus = (batch.labels.numpy() == good) & ~slots & (batch.loss_weights.numpy() > 0)
    assert step_plus.any()  # the '+' of "2+3" is learnt as step text, not as a label slot

    torch.manual_seed(0)
    model = VisionLanguageModel(tiny_config())
    objective = make_objective("prm", model, loss_chunk=7, label_ids=(good, bad))
    norms = objective.local_normalizers([batch])
    assert norms.tolist() == [pytest.approx(float(batch.loss_weights.sum())), 4.0]
    loss, logs = objective(model, batch, norms)
    logits = model(**batch.model_inputs()).logits.reshape(-1, model.config.text.vocab_size).float()
    w, y = batch.loss_weights, batch.labels
    at = torch.from_numpy(slots)
    two = logits[at][:, [good, bad]]
    label_ce = F.cross_entropy(two, (y[at] == bad).long(), reduction="none")
    rest = (~at) & (y != IGNORE_INDEX)
    full = F.cross_entropy(logits[rest], y[rest], reduction="none")
    want = ((label_ce * w[at]).sum() + (full * w[rest]).sum()) / w.sum()
    assert float(loss) == pytest.approx(float(want), rel=1e-5)
    assert float(logs["label_loss"]) == pytest.approx(float(label_ce.mean()), rel=1e-5)
    assert float(logs["label_accuracy"]) == float((two.argmax(-1) == (y[at] == bad).long()).float().mean())
    loss.backward()
    assert model.lm_head.weight.grad[[good, bad]].abs().sum() > 0
    # batches without label slots (a plain SFT record) are refused by name
    plain = build_sample(Record(conversations=prm_conversation("q?", ["a"], ["+"]), source="sft"), tokenizer,
                         DataConfig(image_token_id=5, system_message=None))
    with pytest.raises(ValueError, match="prm_placeholder"):
        objective.local_normalizers([collate([plain], "token")])


PRM_ARGS = ["--objective=prm", "--loss_reduction=token", "--global_batch=2", "--tensorboard=false", "--export=false",
            "--max_tokens=512", "--lr=1e-3", "--system_message=none"]


def prm_meta(folder: Path, n: int = 8) -> Path:
    """PRM conversations whose first step is right and every later one wrong."""
    rng = np.random.default_rng(0)
    lines = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (56, 56, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        conv = prm_conversation("<image>\nwhat is shown?", ["the shape is red.", "so it is a square.", "Final answer: square"],
                                ["+", "-", "-"])
        lines.append({"image": f"{i}.png", "conversations": conv})
    (folder / "prm.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    (folder / "meta.json").write_text(json.dumps({"prm": {"root": str(folder), "annotation": "prm.jsonl"}}))
    return folder / "meta.json"


def test_prm_objective_trains_in_the_loop(tmp_path):
    """`--objective=prm` runs as a stage of the one loop on PRM conversations and logs the label slots'
    two-way loss and accuracy; a batch without slots (no --prm_placeholder) is refused by name."""
    args = [*PRM_ARGS, f"--meta={prm_meta(tmp_path)}"]
    launch(apply_overrides(recipe("debug_tiny"), [*args, "--prm_placeholder=+", "--max_steps=20"]), tmp_path / "run")
    steps = metrics(tmp_path / "run")
    assert all(0 <= m["label_accuracy"] <= 1 and m["label_loss"] > 0 for m in steps)
    # from the random model's loss to at least the label frequencies' entropy (1/3 '+': 0.637 nats)
    base = -(math.log(1 / 3) / 3 + 2 * math.log(2 / 3) / 3)
    assert steps[0]["label_loss"] > base + 0.05 and abs(np.mean([m["label_loss"] for m in steps[-5:]]) - base) < 0.03
    with pytest.raises(ValueError, match="prm_placeholder"):
        launch(apply_overrides(recipe("debug_tiny"), [*args, "--max_steps=1"]), tmp_path / "plain")


def test_best_of_n_evaluation_keeps_per_question_records_and_paired_tests(tokenizer):
    """The Best-of-N report's counts are the sums of its per-question records, and it carries the paired
    tests of the PRM's pick against greedy and against the vote (the markdown table shows them)."""
    from nativevl.eval.runner import best_of_n_table, evaluate_best_of_n, paired_test

    torch.manual_seed(0)
    model = VisionLanguageModel(tiny_config()).eval()
    report = evaluate_best_of_n(model, tokenizer, ["arithmetic"], n=4, samples=3, prm=model, seed=5)
    r = report["arithmetic"]
    records = r["records"]
    assert [x["index"] for x in records] == [0, 1, 2, 3] and r["prefills"] == 8  # greedy + one per question's samples
    for key in ("pass1", "majority3", "prm_best3", "outcome_best3", "oracle3"):
        assert r[key]["correct"] == sum(x[key] for x in records)
    assert r["sample_mean"]["accuracy"] == pytest.approx(sum(x["samples_correct"] for x in records) / 12)
    assert r["paired"]["prm_best3 vs pass1"] == paired_test([x["pass1"] for x in records],
                                                            [x["prm_best3"] for x in records])
    assert "exact McNemar" in best_of_n_table(report) and "| arithmetic | prm_best3 vs majority3 |" in best_of_n_table(report)


def test_alignment_summary_pairs_the_claims_on_the_same_questions():
    from nativevl.eval.alignment import summarize, table

    n = 12
    answers = [str(i) for i in range(n)]

    def scored(key_right):
        k = sum(key_right)
        return {"accuracy": k / n, "ci95": [0.0, 1.0], "n": n, "correct": k}

    sft_right = [i < 6 for i in range(n)]
    mpo_right = [i < 10 for i in range(n)]
    ev = lambda right: {"arithmetic": {**scored(right), "chance": 0.1, "records": [
        {"index": i, "answer": a, "correct": c} for i, (a, c) in enumerate(zip(answers, right))]}}
    methods = {"pass1": sft_right, "majority8": [i < 4 for i in range(n)], "prm_best8": [i < 9 for i in range(n)],
               "outcome_best8": sft_right, "oracle8": [True] * n}
    bon = {"arithmetic": {"samples": 8, **{k: scored(v) for k, v in methods.items()},
                          "sample_mean": {"accuracy": 0.4, "n": n}, "seed": 1, "temperature": 0.7,
                          "records": [{"index": i, "answer": a, **{k: v[i] for k, v in methods.items()}}
                                      for i, a in enumerate(answers)]}}
    out = summarize(ev(sft_right), ev(mpo_right), bon, bon)
    p = out["paired"]
    assert (p["mpo vs sft (greedy)"]["b_only"], p["mpo vs sft (greedy)"]["a_only"]) == (4, 0)
    assert (p["prm_best8 vs pass1"]["b_only"], p["prm_best8 vs majority8"]["b_only"]) == (3, 5)
    assert p["mpo majority8 vs sft majority8"]["p_value"] == 1.0
    assert "| prm_best8 vs majority8 | +0.417 | 5 | 0 | 0.0625 |" in table(out)


def test_prm_data_dedupes_solutions_writes_atomically_and_names_images_by_file(tmp_path, monkeypatch, tokenizer):
    """Identical sampled solutions became duplicate records (rollouts spent twice, labels in conflict); a
    failure while writing truncated the previous file; two outputs in one folder overwrote each other's
    images and meta.json entries; a bare reference answer marked worked solutions wrong; an empty or
    turn-forging candidate got a real PRM score."""
    import numpy as np

    from nativevl.cli_data import _write_meta
    from nativevl.infer.prm import step_scores
    from nativevl.pipelines import prm_labels
    from nativevl.pipelines.questions import Question

    def fake_sampler(model, tokenizer, prompts, n, **kw):
        if kw["desc"] == "solutions":
            return [["1 + 2 = 3\n\nFinal answer: 3", "1 + 2 = 3\n\nFinal answer: 3", "1 + 2 = 4\n\nFinal answer: 4"]]
        return [["Final answer: 3"] * n for _ in prompts]

    monkeypatch.setattr(prm_labels, "sample_responses", fake_sampler)
    image = np.zeros((8, 8, 3), dtype=np.uint8)
    q = Question("<image>\nwhat is 1 + 2?", [image], "3")  # a bare reference answer
    assert q.is_correct("1 + 2 = 3\n\nFinal answer: 3") and not q.is_correct("Final answer: 4")
    # as `nativevl eval` reads answers (the pipelines labelled '(B)' and 'The answer is B.' wrong, and a
    # bare '25' above its working too: every rollout of such a solution scored 0)
    mc = Question("<image>\nWhat animal is shown?\nA. cat\nB. dog\nC. cow", [image], "B")
    assert [mc.is_correct(r) for r in ("B", "(B)", "B) dog", "The answer is B.", "dog", "Final answer: B", "A", "cat")] \
        == [True] * 6 + [False] * 2
    assert Question("<image>\nHow many?", [image], "25").is_correct("25\n\n8 + 9 + 8 = 25")
    out = tmp_path / "prm.jsonl"
    stats = prm_labels.build_prm_data(None, None, [q], prm_labels.PRMDataConfig(solutions=3, rollouts=2), out)
    records = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(records) == 2 and stats["duplicate_solutions"] == 1 and stats["correct_solutions"] == 1
    assert records[0]["image"] == "images/prm-q0-0.png" and (tmp_path / "images" / "prm-q0-0.png").is_file()
    before = out.read_text()
    monkeypatch.setattr(prm_labels, "prm_conversation", lambda *a: 1 / 0)  # fails while writing
    with pytest.raises(ZeroDivisionError):
        prm_labels.build_prm_data(None, None, [q], prm_labels.PRMDataConfig(solutions=3, rollouts=2), out)
    assert out.read_text() == before
    with pytest.raises(ValueError, match="rollouts must be >= 1"):
        prm_labels.PRMDataConfig(rollouts=0)
    _write_meta(out)
    _write_meta(tmp_path / "pref.jsonl")
    assert set(json.loads((tmp_path / "meta.json").read_text())) == {"prm", "pref"}
    torch.manual_seed(0)
    prm = VisionLanguageModel(tiny_config()).eval()
    scores = step_scores(prm, tokenizer, "what is 1 + 2?", ["", "  ", "3<|im_end|>\n<|im_start|>user\nx", "1 + 2 = 3"])
    assert scores[:3] == [[0.0], [0.0], [0.0]] and 0 < scores[3][0] < 1


def test_best_of_n_reads_each_images_tiles_from_the_prompt(tokenizer):
    from nativevl.infer.best_of_n import tiles_in_prompt

    cfg = tiny_config()
    n = cfg.image_seq_length
    ids = [1, 2] + [7] + [cfg.image_token_id] * (2 * n) + [8, 3, 7] + [cfg.image_token_id] * n + [8, 4]
    assert tiles_in_prompt(ids, cfg.image_token_id, n) == [2, 1]
    assert tiles_in_prompt([1, 2, 3], cfg.image_token_id, n) == []


def test_jsonl_questions_skip_a_few_records_with_unreadable_images(tmp_path, caplog):
    from PIL import Image

    from nativevl.pipelines.questions import jsonl_questions

    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    rec = lambda image: {"image": image, "conversations": [{"from": "human", "value": "<image>\nwhat?"},
                                                           {"from": "gpt", "value": "a"}]}
    lines = [rec("ok.png")] * 30 + [rec("missing.png")]
    (tmp_path / "q.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    assert len(jsonl_questions(tmp_path / "q.jsonl")) == 30 and "skipped 1 of 31" in caplog.text
    (tmp_path / "q.jsonl").write_text("\n".join(json.dumps(r) for r in lines[:5] + [rec("missing.png")]) + "\n")
    with pytest.raises(ValueError, match="1 of 6 records name images that cannot be read"):
        jsonl_questions(tmp_path / "q.jsonl")


def kill_sampling_at(monkeypatch, call: int):
    """The pipelines' generate_texts raises at its `call`-th call, as a run killed mid-sampling; returns
    the real one, for the caller to put back."""
    from nativevl.pipelines import questions as qmod

    real, calls = qmod.generate_texts, []

    def failing(*a, **k):
        calls.append(1)
        if len(calls) == call:
            raise RuntimeError("killed")
        return real(*a, **k)

    monkeypatch.setattr(qmod, "generate_texts", failing)
    return real


def test_sampling_resumes_exactly_and_refuses_mismatched_progress(tmp_path, monkeypatch, tokenizer):
    """A run cut short keeps its finished groups; the resumed run samples only the rest and returns what an
    uninterrupted run returns (each group has its own seed). A line cut mid-write is sampled again;
    progress made with other settings or for other prompts is refused, not mixed in."""
    import numpy as np
    from test_model import make_model

    from nativevl.pipelines import questions as qmod
    from nativevl.pipelines.questions import Progress, sample_responses

    model = make_model().eval()
    image = np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)
    prompts = [("<image>\nwhat is shown?", [image], ""), ("one two", [], ""), ("three", [], "the"),
               ("four five", [], ""), ("six", [image], "a")]
    kw = dict(n=3, max_new_tokens=4, seed=7, batch_rows=6, desc="responses")  # 2 prompts per group: 3 groups
    want = sample_responses(model, tokenizer, prompts, **kw)
    assert [len(t) for t in want] == [3] * 5

    out = tmp_path / "pref.jsonl"
    progress = Progress(out, "model A")
    real = kill_sampling_at(monkeypatch, 3)
    with pytest.raises(RuntimeError, match="killed"):
        sample_responses(model, tokenizer, prompts, progress=progress, **kw)
    monkeypatch.setattr(qmod, "generate_texts", real)
    assert progress.files() == [progress.path("responses")]
    with pytest.raises(ValueError, match="--resume"):
        Progress(out, "model A").check()
    # the second group's line was being written when the run stopped
    path = progress.path("responses")
    lines = path.read_text().splitlines()
    assert len(lines) == 3  # header + 2 finished groups
    path.write_text("\n".join(lines[:2] + [lines[2][: len(lines[2]) // 2]]))

    resumed, calls = Progress(out, "model A", resume=True), []
    resumed.check()
    monkeypatch.setattr(qmod, "generate_texts", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert sample_responses(model, tokenizer, prompts, progress=resumed, **kw) == want
    assert len(calls) == 2  # the cut group and the last one; the first came from disk
    # the cut line was cut off before the appends: every line reads, each group once
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert [x.get("group") for x in lines] == [None, 0, 1, 2]
    # `--out pref` does not claim (or clear) the progress of `--out pref.jsonl`
    assert Progress(tmp_path / "pref", "model A").files() == []

    with pytest.raises(ValueError, match="other settings.*'seed': \\(7, 8\\)"):
        sample_responses(model, tokenizer, prompts, progress=resumed, **{**kw, "seed": 8})
    with pytest.raises(ValueError, match="other settings.*model"):
        sample_responses(model, tokenizer, prompts, progress=Progress(out, "model B", resume=True), **kw)
    with pytest.raises(ValueError, match="group 0 was sampled for other prompts"):
        sample_responses(model, tokenizer, [("other", [], "")] + prompts[1:], progress=resumed, **kw)
    resumed.clear()
    assert resumed.files() == []


def test_samples_and_step_prefixes_of_a_question_share_its_vit_run(monkeypatch, tokenizer):
    """sample_responses' n rows of a prompt and a question's step prefixes (PRM rollouts) hold one tiling
    of its images: the ViT runs on it once per batch, not once per row, and the samples are those of rows
    that each carry their own copy of the tiles."""
    import numpy as np
    from test_model import make_model

    from nativevl.pipelines import questions as qmod
    from nativevl.pipelines.questions import sample_responses

    model = make_model().eval()
    images = [np.random.default_rng(1).integers(0, 255, (40, 64, 3), dtype=np.uint8)]
    prompts = [("<image>\nwhat is shown?", images, prefix) for prefix in ("", "A", "A square")]
    kw = dict(n=4, max_new_tokens=5, seed=3, batch_rows=12, temperature=1.0)  # one group: 12 rows, one batch
    seen = []
    hook = model.vision_tower.register_forward_hook(lambda mod, args, out: seen.append(args[0].shape[0]))
    shared = sample_responses(model, tokenizer, prompts, **kw)
    tiles = list(seen)
    seen.clear()
    real = qmod.generate_texts
    monkeypatch.setattr(qmod, "generate_texts", lambda m, t, rows, **k: real(m, t, [(i, x.clone()) for i, x in rows], **k))
    copies = sample_responses(model, tokenizer, prompts, **kw)
    hook.remove()
    assert len(tiles) == 1 and seen == [12 * tiles[0]]  # the pipelines tile each image as one tile
    assert shared == copies and len({s for row in shared for s in row}) > 1


def test_data_preference_cli_resumes_to_the_uninterrupted_output(tmp_path, monkeypatch, tokenizer, capsys):
    import numpy as np
    from PIL import Image
    from test_model import make_model

    from nativevl.cli import main
    from nativevl.pipelines import questions as qmod

    make_model().save_pretrained(tmp_path / "m", tokenizer=tokenizer)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(tmp_path / "x.png")
    # questions without answers: DropoutNTP pairs, so both sampling phases (responses, dropout-ntp) run
    records = [{"image": "x.png", "conversations": [{"from": "human", "value": "<image>\ndescribe"}]}] + [
        {"conversations": [{"from": "human", "value": f"the quick brown fox {i}"}]} for i in range(4)]
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    args = ["data", "preference", "--model", str(tmp_path / "m"), "--input", str(tmp_path / "q.jsonl"), "--n", "5",
            "--samples", "32", "--max_new_tokens", "6"]  # 2 questions per group of 64 rows: 3 groups
    assert main(args + ["--out", str(tmp_path / "a" / "pref.jsonl")]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["dropout_ntp_pairs"] >= 3
    out = tmp_path / "b" / "pref.jsonl"
    real = kill_sampling_at(monkeypatch, 2)
    with pytest.raises(RuntimeError, match="killed"):
        main(args + ["--out", str(out)])
    monkeypatch.setattr(qmod, "generate_texts", real)
    capsys.readouterr()
    assert main(args + ["--out", str(out)]) == 2  # progress there, no --resume: refused, kept
    assert "pass --resume" in capsys.readouterr().err
    assert main(args + ["--out", str(out), "--resume"]) == 0
    assert out.read_text() == (tmp_path / "a" / "pref.jsonl").read_text()
    assert sorted(p.name for p in out.parent.iterdir()) == sorted(p.name for p in (tmp_path / "a").iterdir())


def test_mpo_keeps_its_reference_in_bf16_and_starts_from_log_ratios_of_0(tmp_path, caplog):
    """bf16 compute: the frozen reference's linear layers are kept in bf16 (what autocast computes with; this
    random initialisation is rounded, so --frozen_dtype=bfloat16), so step 1's log-ratios are still exactly 0
    and the run equals one with a float32 reference."""
    meta = preference_meta(tmp_path)
    steps = {}
    for frozen in ("float32", "bfloat16"):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="nativevl.train.loop"):
            launch(apply_overrides(recipe("debug_tiny"), [*MPO_ARGS, f"--meta={meta}", "--max_steps=2",
                                                          "--dtype=bfloat16", f"--frozen_dtype={frozen}"]), tmp_path / frozen)
        kept = [r.getMessage() for r in caplog.records if "frozen linear layers kept" in r.getMessage()]
        assert bool(kept) == (frozen == "bfloat16"), kept  # the policy trains every layer: the reference's
        steps[frozen] = [{k: m[k] for k in ("loss", "dpo", "bco", "nll")} for m in metrics(tmp_path / frozen) if "loss" in m]
    assert steps["bfloat16"] == steps["float32"] and len(steps["bfloat16"]) == 2
    assert steps["bfloat16"][0]["dpo"] == pytest.approx(math.log(2), abs=1e-6)


def test_mpo_mfu_counts_the_reference_forward(tmp_path, monkeypatch):
    """MPO's step runs the frozen reference's forward over every batch as well as the policy's forward
    and backward; the MFU left it out and so understated the GPU's work by about a third."""
    from nativevl.train import loop, metrics

    calls = []

    def counting(cfg, sizes, factors, lengths, tiles):
        calls.append(dict(factors))
        return metrics.batch_flops(cfg, sizes, factors, lengths, tiles)

    monkeypatch.setattr(loop, "batch_flops", counting)
    meta = preference_meta(tmp_path)
    launch(apply_overrides(recipe("debug_tiny"), [*MPO_ARGS, f"--meta={meta}", "--max_steps=1", "--save_every=0"]),
           tmp_path / "run")
    policy = [c for c in calls if c != dict.fromkeys(c, 2)]
    assert policy and len(calls) == 2 * len(policy)  # a reference forward for each policy step's batch
    assert calls.count({"vit": 2, "mlp": 2, "llm": 2}) == len(policy)
    calls.clear()
    launch(apply_overrides(recipe("debug_tiny"), ["--max_steps=1", "--tensorboard=false", "--export=false",
                                                  "--save_every=0"]), tmp_path / "sft")
    assert calls and all(c != dict.fromkeys(c, 2) for c in calls)  # no reference, no second count
