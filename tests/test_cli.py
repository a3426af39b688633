"""The command line a user runs: chat on a saved checkpoint, and the demo's smoke run."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from test_model import make_model

from nativevl import VisionLanguageModel
from nativevl.cli import main
from nativevl.data.images import choose_grid, image_to_tiles
from nativevl.data.template import render_chat


def test_chat_answers_about_an_image(tmp_path, tokenizer, capsys):
    model = make_model()
    model.save_pretrained(tmp_path / "m", tokenizer=tokenizer)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 150, 3), dtype=np.uint8)).save(tmp_path / "x.png")
    code = main(["chat", "--model", str(tmp_path / "m"), "--image", str(tmp_path / "x.png"),
                 "--prompt", "what is shown?", "--max_new_tokens", "5", "--max_num", "4"])
    assert code == 0
    err = capsys.readouterr().err
    assert "tokens in" in err and "3 tile(s)" in err  # 150x80 -> 2x1 grid + thumbnail


def test_serve_and_chat_pass_the_decode_options_to_the_engine():
    from nativevl.cli import _engine_options, build_parser
    from nativevl.infer.slot_decoder import GEMV_OPTIONS

    for command in ("serve", "chat"):
        args = build_parser().parse_args([command, "--model", "m", "--decode-gemv", "--decode-chunk", "8",
                                          "--decode-attention", "split", "--vision-cache-mb", "0",
                                          "--compile-prefill", "--no-prefix-cache", "--prefix-min-tokens", "16"])
        assert _engine_options(args) == {"decode_chunk": 8, "decode_attention": "split", "vision_cache_mb": 0,
                                         "compile_options": GEMV_OPTIONS, "compile_prefill": True,
                                         "prefix_cache": False, "prefix_min_tokens": 16}
        plain = _engine_options(build_parser().parse_args([command, "--model", "m"]))
        assert plain["compile_options"] is None and plain["decode_chunk"] == 1 and not plain["compile_prefill"]
        assert plain["prefix_cache"] and plain["prefix_min_tokens"] == 64


def test_chat_reports_a_missing_image(tmp_path, tokenizer, capsys):
    make_model().save_pretrained(tmp_path / "m", tokenizer=tokenizer)
    code = main(["chat", "--model", str(tmp_path / "m"), "--image", str(tmp_path / "nope.png"), "--prompt", "hi"])
    assert code == 2 and "nope.png does not exist" in capsys.readouterr().err


def test_eval_resumes_the_tasks_its_report_already_holds(tmp_path, tokenizer, monkeypatch, caplog):
    make_model().save_pretrained(tmp_path / "m", tokenizer=tokenizer)
    out = tmp_path / "e.json"
    base = ["eval", "--model", str(tmp_path / "m"), "--n", "3", "--out", str(out)]
    assert main(base + ["--tasks", "text"]) == 0
    first = json.loads(out.read_text())["text"]
    assert len(first["records"]) == 3 and first["settings"]["n"] == 3
    # the run that adds a task: text is taken from the report, only shapes is generated
    from nativevl.eval import runner

    asked = []
    real = runner.predict
    monkeypatch.setattr(runner, "predict", lambda *a, desc="", **k: asked.append(desc) or real(*a, desc=desc, **k))
    with caplog.at_level("INFO", logger="nativevl.eval.runner"):
        assert main(base + ["--tasks", "text,shapes", "--resume"]) == 0
    report = json.loads(out.read_text())
    assert asked == ["shapes"] and "reusing" in caplog.text and report["text"] == first and "shapes" in report
    # a run of one task keeps the other finished task of the same model and settings
    assert main(base + ["--tasks", "shapes", "--resume"]) == 0
    assert asked == ["shapes"] and set(json.loads(out.read_text())) == {"text", "shapes"}
    # other settings (another seed), other weights saved in the same folder: run again, old tasks dropped
    assert main(base + ["--tasks", "text", "--resume", "--seed", "7"]) == 0
    assert asked == ["shapes", "text"] and set(json.loads(out.read_text())) == {"text"}
    make_model(seed=1).save_pretrained(tmp_path / "m", tokenizer=tokenizer)
    assert main(base + ["--tasks", "text", "--resume", "--seed", "7"]) == 0
    assert asked == ["shapes", "text", "text"]
    for bad in ("{not json", "[1]"):
        out.write_text(bad)
        assert main(base + ["--tasks", "text", "--resume"]) == 2


def test_quick_demo_runs_end_to_end_via_python_m(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "nativevl", "demo", "--out", str(tmp_path), "--quick"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert set(report["stages"]) == {"pretrain", "sft"}
    for stage in report["stages"].values():
        for task in ("shapes", "reading", "charts", "arithmetic", "multi_image", "text"):
            r = stage[task]
            assert r["n"] == 6 and 0 <= r["accuracy"] <= 1 and 0 < r["chance"] <= 0.2 and len(r["ci95"]) == 2
    assert (tmp_path / "loss.png").stat().st_size > 1000 and "| shapes |" in (tmp_path / "report.md").read_text()
    assert VisionLanguageModel.from_pretrained(tmp_path / "sft" / "final").config.image_seq_length == 9
    assert (tmp_path / "data" / "meta.json").is_file()
    assert "nativevl chat --model" in proc.stdout and report["resumed"] == []
    assert set(report["validation_loss"]) == {"pretrain", "sft"} and "held-out records" in (tmp_path / "report.md").read_text()
    # SFT evaluated inside its run (every fifth of its steps; a 6-step run at its end), on half the questions
    by_step = report["sft_scores_by_step"]
    assert list(by_step) == ["6"] and set(by_step["6"]) == set(report["stages"]["sft"])
    assert json.loads((tmp_path / "sft" / "evals" / "step-000006.json").read_text())["shapes"]["n"] == 3
    assert (tmp_path / "scores.png").stat().st_size > 1000 and "### During SFT" in (tmp_path / "report.md").read_text()
    # run again in the same folder: both stages are reused, and the report says so
    from nativevl.demo import DemoConfig, run_demo

    again = run_demo(tmp_path, DemoConfig.quick())
    assert again["resumed"] == ["pretrain", "sft"] and "Resumed: pretrain, sft" in (tmp_path / "report.md").read_text()
    assert again["stages"]["sft"]["shapes"]["accuracy"] == report["stages"]["sft"]["shapes"]["accuracy"]


def test_demo_refuses_a_folder_of_another_run(tmp_path):
    import dataclasses

    from nativevl.demo import DemoConfig, _claim

    assert _claim(tmp_path / "a", DemoConfig.quick()) == []
    with pytest.raises(ValueError, match="settings sft_steps"):
        _claim(tmp_path / "a", dataclasses.replace(DemoConfig.quick(), sft_steps=7))
    (tmp_path / "b" / "tokenizer").mkdir(parents=True)
    with pytest.raises(ValueError, match="no demo.json"):
        _claim(tmp_path / "b", DemoConfig.quick())


def test_tiling_grid_and_prompt():
    assert choose_grid(800, 600) == (4, 3)
    assert choose_grid(1920, 1080) == (4, 2)
    assert choose_grid(448, 448) == (1, 1)
    tiles = image_to_tiles(Image.new("RGB", (800, 600), (255, 0, 0)), image_size=56)
    assert tiles.shape == (13, 3, 56, 56)
    assert torch.allclose(tiles[0, 0], torch.full((56, 56), (1 - 0.485) / 0.229), atol=1e-5)
    text = render_chat([{"role": "user", "content": "hi"}], tiles_per_image=[2], image_seq_length=3, system_message="")
    assert text == "<|im_start|>user\n<img>" + "<IMG_CONTEXT>" * 6 + "</img>\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_tokenizer_folder_must_have_internvl_tokens(tmp_path, tokenizer):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from nativevl.io.tokenizer import load_tokenizer

    tokenizer.save_pretrained(tmp_path / "good")
    loaded = load_tokenizer(tmp_path / "good")
    assert loaded.convert_tokens_to_ids(["<img>", "</img>", "<IMG_CONTEXT>"]) == [3, 4, 5]
    assert loaded.eos_token == "<|im_end|>" and loaded.context_image_token == "<IMG_CONTEXT>"
    plain = Tokenizer(models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>"))
    plain.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=plain).save_pretrained(tmp_path / "bad")
    import pytest

    with pytest.raises(ValueError, match=r"lacks InternVL special token\(s\) \['<img>'"):
        load_tokenizer(tmp_path / "bad")


def test_train_names_the_inputs_a_recipe_needs(tmp_path, capsys):
    """`nativevl train sft` without --meta / --init_from trained a tiny random model on generated toy
    data and exported it as if all were well; now it stops at once and says what is missing."""
    code = main(["train", "sft", "--out", str(tmp_path / "a"), "--max_steps=1", "--max_tokens=512", "--tensorboard=false"])
    err = capsys.readouterr().err
    assert code == 2 and "recipe sft needs --meta" in err and "--init_from" in err
    assert not (tmp_path / "a" / "final").exists()
    code = main(["train", "mpo", "--out", str(tmp_path / "b"), "--meta", str(tmp_path / "meta.json")])
    err = capsys.readouterr().err
    assert code == 2 and "recipe mpo needs --init_from" in err and "--meta" not in err
    # pre-training with nothing to start from trained the tiny preset and a toy tokenizer on the user's data
    code = main(["train", "pretrain", "--out", str(tmp_path / "c"), "--meta", str(tmp_path / "meta.json")])
    assert code == 2 and "recipe pretrain needs --vit_from and --llm_from" in capsys.readouterr().err


def test_user_mistakes_are_errors_not_tracebacks_or_lost_files(tmp_path, tokenizer, capsys):
    """convert into a folder of other things replaced it whole (and hid a file in its way); eval with a
    batch size < 1 wrote a false report, divided by zero or hung; a path through a file and a device this
    torch lacks printed tracebacks."""
    make_model().save_pretrained(tmp_path / "m", tokenizer=tokenizer)
    (tmp_path / "models" / "other").mkdir(parents=True)
    (tmp_path / "models" / "README.txt").write_text("mine")
    (tmp_path / "notes.json").write_text("{}")
    for dst, said in ((tmp_path / "models", "holding other things than a checkpoint"), (tmp_path / "notes.json", "is a file")):
        assert main(["convert", str(tmp_path / "m"), str(dst), "--to", "internvl"]) == 2
        assert said in capsys.readouterr().err
    assert (tmp_path / "models" / "README.txt").read_text() == "mine" and (tmp_path / "notes.json").read_text() == "{}"
    assert main(["convert", str(tmp_path / "m"), str(tmp_path / "m"), "--to", "internvl"]) == 0  # its own folder
    for bad in ("0", "-1"):
        assert main(["eval", "--model", str(tmp_path / "m"), "--tasks", "shapes", "--n", "2", "--batch_size", bad,
                     "--out", str(tmp_path / "e.json")]) == 2
        assert "--batch_size must be >= 1" in capsys.readouterr().err
    assert main(["eval", "--model", str(tmp_path / "m"), "--tasks", "shapes", "--out", str(tmp_path / "notes.json" / "e.json")]) == 2
    assert "its folder must be a folder" in capsys.readouterr().err
    assert main(["train", "debug_tiny", "--out", str(tmp_path / "notes.json" / "run")]) == 2
    assert "error:" in capsys.readouterr().err
    for device in ("gpu", "cuda:0" if not torch.cuda.is_available() else "gpu"):
        assert main(["chat", "--model", str(tmp_path / "m"), "--prompt", "hi", "--device", device]) == 2
        assert f"--device {device}" in capsys.readouterr().err


def test_chat_session_commands(tmp_path, tokenizer, monkeypatch, capsys):
    """A bare or mistyped /command went to the model as a message; ~ and quotes in a path failed; piped
    answers ran together on one line; ^C ended the chat with a traceback."""
    import io

    from nativevl.infer import chat

    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "x.png")
    monkeypatch.setenv("HOME", str(tmp_path))
    asked = []

    class Conv:
        def reset(self):
            asked.append("reset")

    def answer(conv, text, images, video):
        asked.append((text, list(images)))
        if text == "slow":
            raise KeyboardInterrupt
        sys.stdout.write("an answer\n")

    monkeypatch.setattr(chat, "answer", answer)
    lines = ["/image", "/imge x.png", "/image '~/x.png'", "what?", "slow", "//image is a word", "/reset", ""]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(lines)))
    assert chat.session(Conv()) == 0
    assert asked == [("what?", [str(tmp_path / "x.png")]), ("slow", []), ("/image is a word", []), "reset"]
    err = capsys.readouterr().err
    assert "usage: /image PATH" in err and "unknown command /imge" in err and "[interrupted]" in err

    class Interrupted(io.StringIO):
        def readline(self, *a):
            raise KeyboardInterrupt

    monkeypatch.setattr(sys, "stdin", Interrupted())
    assert chat.session(Conv()) == 0


def test_train_refuses_non_finite_or_negative_settings(tmp_path, capsys):
    """--lr=nan used to be accepted (NaN passes every range check; the first update made every weight NaN)."""
    code = main(["train", "debug_tiny", "--out", str(tmp_path / "a"), "--lr=nan"])
    assert code == 2 and "lr must be a finite number >= 0, got nan" in capsys.readouterr().err
    code = main(["train", "debug_tiny", "--out", str(tmp_path / "b"), "--warmup_steps=-1"])
    assert code == 2 and "warmup_steps must be >= 0" in capsys.readouterr().err
    for bad, message in (("--loss_chunk=0", "loss_chunk must be >= 1, got 0"),  # was range()'s 'arg 3 must not be zero'
                         ("--mpo_quality_weight=nan", "mpo_quality_weight must be a finite number >= 0, got nan"),
                         ("--min_lr_ratio=2", "min_lr_ratio is the floor of the schedule as a share of lr: at most 1")):
        code = main(["train", "debug_tiny", "--out", str(tmp_path / "c"), bad])
        assert code == 2 and message in capsys.readouterr().err, bad


def test_every_help_text_prints(capsys):
    """`nativevl --help` crashed: argparse read the '% i' of '95% interval' in a subcommand's help as a
    format code. Every command's help is printed here."""
    import argparse

    from nativevl.cli import build_parser

    parser = build_parser()
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0 and "eval" in capsys.readouterr().out
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in subparsers.choices.items():
        assert sub.format_help(), name


def test_sizes_pipes_home_folders_and_serving_options_before_the_model(tmp_path, monkeypatch, capsys):
    """`--max_shard_size 5G` was refused (only '5GB'); `nativevl ... | head` ended in a Broken pipe error
    and an 'Exception ignored' at exit; `--meta=~/x` kept its '~' (the shell does not expand it after
    '='); serve checked --allowed-local-media and --num_frames only after loading the model, and took
    --vision-cache-mb -1 as 'no cache'."""
    import argparse

    from nativevl.cli import parse_size
    from nativevl.recipes import apply_overrides, recipe

    assert parse_size("5G") == parse_size("5GB") == parse_size("5gib") == parse_size("5 GiB") == 5 * 1024**3
    assert parse_size("500M") == 500 * 1024**2 and parse_size("1024") == parse_size("1024B") == 1024
    for bad in ("5X", "GB", "-1GB", "5GBB"):
        with pytest.raises(argparse.ArgumentTypeError, match="cannot read size"):
            parse_size(bad)

    monkeypatch.setenv("HOME", str(tmp_path))
    run = apply_overrides(recipe("sft"), ["--meta=~/data/meta.json", "--init_from", "~/ckpt", "--tokenizer=a~b"])
    assert run.meta == str(tmp_path / "data" / "meta.json") and run.model.init_from == str(tmp_path / "ckpt")
    assert run.model.tokenizer == "a~b"

    loaded = []
    monkeypatch.setattr("nativevl.cli._serving_model", lambda args: loaded.append(args) or 1 / 0)
    for option, said in ((["--allowed-local-media", str(tmp_path / "nope")], "is not a folder"),
                         (["--num_frames", "64"], "--num_frames 64 must be in [1, --max-video-frames 32]"),
                         (["--vision-cache-mb", "-1"], "--vision-cache-mb must be >= 0"),
                         (["--vision-cache-mb", "nan"], "--vision-cache-mb must be >= 0"),
                         (["--decode-chunk", "0"], "--decode-chunk must be >= 1")):
        assert main(["serve", "--model", str(tmp_path), *option]) == 2
        assert said in capsys.readouterr().err
    assert main(["chat", "--model", str(tmp_path), "--prompt", "hi", "--prefix-min-tokens", "0"]) == 2
    assert "--prefix-min-tokens must be >= 1" in capsys.readouterr().err
    assert not loaded

    # a reader that leaves early: quiet, status 141 as a shell reports SIGPIPE, and a clean exit
    script = ("import sys\nfrom nativevl.cli import main\n"
              "sys.exit(main(['plan', 'debug_tiny'] + ['--max_tokens=512'] * 1))\n")
    import os

    r, w = os.pipe()
    os.close(r)  # nobody reads: the first flush fails
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-c", script], check=False, stdout=w, stderr=subprocess.PIPE, text=True, env=env,
                          timeout=120)
    os.close(w)
    assert done.returncode == 141, done.stderr
    assert "Traceback" not in done.stderr and "Exception ignored" not in done.stderr and "error" not in done.stderr


def test_chat_refuses_an_unreadable_picture_when_it_is_named(tmp_path, monkeypatch, capsys):
    """A file that is not a picture was found only at the next question, which failed with it, taking
    the pictures attached before it too, with PIL's message naming a BytesIO object."""
    import io

    from nativevl.infer import chat

    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "good.png")
    (tmp_path / "bad.png").write_bytes(b"GIF89a" + b"\x00" * 10)
    asked = []
    monkeypatch.setattr(chat, "answer", lambda conv, text, images, video: asked.append((text, list(images))))
    lines = [f"/image {tmp_path / 'good.png'}", f"/image {tmp_path / 'bad.png'}", "what?"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(lines) + "\n"))
    assert chat.session(object()) == 0
    assert asked == [("what?", [str(tmp_path / "good.png")])]
    err = capsys.readouterr().err
    assert "bad.png" in err and "(not attached)" in err and "BytesIO" not in err


def test_serve_without_its_extra_says_what_to_install(tmp_path, monkeypatch, capsys):
    """A plain `pip install nativevl` has no FastAPI: serve printed a ModuleNotFoundError traceback."""
    monkeypatch.setitem(sys.modules, "nativevl.infer.server", None)  # as if fastapi could not be imported
    assert main(["serve", "--model", str(tmp_path)]) == 2
    assert "pip install 'nativevl[serve]'" in capsys.readouterr().err
