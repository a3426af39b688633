"""`nativevl` command line: demo, chat, serve, convert, eval, train, data."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

import torch

from nativevl.cli_data import cmd_data_convert, cmd_data_preference, cmd_data_prm, cmd_data_validate
from nativevl.model.attention import DECODE_BACKENDS

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def parse_size(text: str) -> int:
    """'5GB', '5G', '5GiB', '500MB', '1024' -> bytes (binary units, as transformers' max_shard_size)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(?:([KMGT])(?:i?B)?|B)?\s*", text, flags=re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"cannot read size {text!r} (e.g. 5GB, 5G, 500MB, 1048576)")
    scale = {None: 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}[m.group(2) and m.group(2).upper()]
    return int(float(m.group(1)) * scale)


def parse_dtype(text: str) -> torch.dtype:
    if text not in DTYPES:
        raise argparse.ArgumentTypeError(f"unknown dtype {text!r}; choose from {sorted(DTYPES)}")
    return DTYPES[text]


def cmd_convert(args: argparse.Namespace) -> int:
    from nativevl.io.hf import load_model, read_config

    _, layout = read_config(args.src)
    model = load_model(args.src, dtype=args.dtype, adapter=args.adapter)
    model.save_pretrained(args.dst, layout=args.to, max_shard_bytes=args.max_shard_size)
    n = sum(p.numel() for p in model.parameters())
    print(f"converted {args.src} ({layout} layout) -> {args.dst} ({args.to} layout), {n / 1e6:.1f}M parameters")
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from nativevl.io.quantize import quantize_model

    _log_info()
    stats = quantize_model(args.src, args.dst, args.scheme, group_size=args.group_size,
                           max_shard_bytes=args.max_shard_size, calib=args.calib, calib_records=args.calib_records,
                           calib_max_tokens=args.calib_max_tokens, device=args.device)
    group = f"groups of {stats['group_size']}" if stats["group_size"] else "one scale per output channel"
    how = "GPTQ on the calibration records" if stats["method"] == "gptq" else "rounded to nearest"
    print(f"quantized {stats['layers']} LLM linear layers of {args.src} to {stats['bits']} bits ({group}, {how}), "
          f"weights' relative error {stats['rel_error']:.4f}; written {args.dst} (compressed-tensors, -hf layout)")
    print(f"measure what it costs: nativevl eval --model {args.dst} --tasks ... (loads it dequantized)")
    return 0


def _serving_model(args: argparse.Namespace):
    """--model (with --adapter) for chat and serve: bf16 on CUDA, float32 on the CPU, unless --dtype."""
    from nativevl.io.hf import load_model

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        kind = torch.device(device).type
    except RuntimeError as e:
        raise ValueError(f"--device {device}: {e}") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: this torch sees no CUDA device ({torch.__version__})")
    dtype = args.dtype or (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    return load_model(args.model, dtype=dtype, device=device, adapter=args.adapter)


def _log_info() -> None:
    """INFO lines (the server's request timings, GPTQ's progress) with times, as train and serve log."""
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def cmd_chat(args: argparse.Namespace) -> int:
    """Single-shot with --prompt, else a multi-turn session (/image PATH, /video PATH, /reset, /quit); answers stream."""
    from nativevl.data.template import DEFAULT_SYSTEM_MESSAGE
    from nativevl.infer.chat import Conversation, answer, session
    from nativevl.infer.engine import Engine, SamplingParams
    from nativevl.io.tokenizer import load_tokenizer

    if args.num_frames < 1:  # before loading the model
        raise ValueError(f"--num_frames must be >= 1, got {args.num_frames}")
    _check_engine_args(args)
    model = _serving_model(args)
    tokenizer = load_tokenizer(args.model)
    engine = Engine(model, tokenizer, max_batch_size=1,
                    max_seq_len=min(args.max_seq_len, model.config.text.max_position_embeddings),
                    **_engine_options(args))
    params = SamplingParams(max_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            seed=args.seed)
    conversation = Conversation(engine, tokenizer, params, system_message=DEFAULT_SYSTEM_MESSAGE if args.system is None
                                else args.system, max_num=args.max_num, num_frames=args.num_frames)
    if args.prompt is not None:
        answer(conversation, args.prompt, args.image or [], args.video)
        return 0
    return session(conversation, args.image or [], args.video)


def cmd_serve(args: argparse.Namespace) -> int:
    from nativevl.data.template import DEFAULT_SYSTEM_MESSAGE
    from nativevl.infer.engine import Engine
    from nativevl.io.tokenizer import load_tokenizer

    try:
        from nativevl.infer.server import ServerConfig, run
    except ImportError as e:  # the serve extra is not installed
        raise ValueError(f"the server needs FastAPI and uvicorn ({e}): pip install 'nativevl[serve]'") from None

    # the options' own checks come before the model is loaded (minutes for a large one)
    if args.allowed_local_media is not None and not Path(args.allowed_local_media).expanduser().is_dir():
        raise ValueError(f"--allowed-local-media {args.allowed_local_media} is not a folder")
    if not 1 <= args.num_frames <= args.max_video_frames:
        raise ValueError(f"--num_frames {args.num_frames} must be in [1, --max-video-frames {args.max_video_frames}]")
    _check_engine_args(args)
    _log_info()
    model = _serving_model(args)
    engine = Engine(model, load_tokenizer(args.model), max_batch_size=args.max_batch_size,
                    max_seq_len=min(args.max_seq_len, model.config.text.max_position_embeddings),
                    max_queue=args.max_queue, cuda_graphs=not args.no_cuda_graphs, **_engine_options(args))
    cfg = ServerConfig(
        model_name=args.name or Path(args.model).resolve().name,
        max_body_bytes=args.max_body_bytes,
        max_images=args.max_images,
        max_image_pixels=args.max_image_pixels,
        max_tiles=args.max_num,
        max_prompt_tokens=args.max_prompt_tokens,
        allowed_local_media=args.allowed_local_media and str(Path(args.allowed_local_media).expanduser()),
        max_videos=args.max_videos,
        video_frames=args.num_frames,
        max_video_frames=args.max_video_frames,
        system_message=DEFAULT_SYSTEM_MESSAGE if args.system is None else (args.system or None),
    )
    run(engine, cfg, host=args.host, port=args.port)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from nativevl.demo import DemoConfig, run_demo

    run_demo(Path(args.out), DemoConfig.quick() if args.quick else DemoConfig())
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from nativevl.eval.runner import (
        best_of_n_table,
        evaluate,
        evaluate_best_of_n,
        folder_identity,
        markdown_table,
        write_report,
    )
    from nativevl.io.hf import load_model
    from nativevl.io.tokenizer import load_tokenizer
    from nativevl.train.parallel import init_distributed

    if args.batch_size < 1:
        raise ValueError(f"--batch_size must be >= 1, got {args.batch_size}")
    out = Path(args.out)
    if out.is_dir() or any(p.exists() and not p.is_dir() for p in out.parents):
        raise ValueError(f"--out {out}: the report is a file, and its folder must be a folder")
    rank, world, device = init_distributed()
    model = load_model(args.model, dtype=torch.float32, device=device, adapter=args.adapter)
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    tasks = [t for t in args.tasks.split(",") if t]
    previous = None
    if args.resume and Path(args.out).is_file():
        try:
            previous = json.loads(Path(args.out).read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"--resume: {args.out} is not a readable report ({e}); move it away to start afresh") from None
        if not isinstance(previous, dict):
            raise ValueError(f"--resume: {args.out} is not an evaluation report (a JSON object of tasks)")
    # what a resumed task must have been made with: these folders, with these very files in them
    identity = f"model {folder_identity(args.model)}; tokenizer {folder_identity(args.tokenizer or args.model)}"
    if args.adapter:
        identity += f"; adapter {folder_identity(args.adapter)}"

    title = f"{args.model}, best of {args.best_of_n}, PRM {args.prm}, seed {args.seed}"

    def on_task(report: dict) -> None:  # the finished tasks are on disk whatever happens next
        if rank == 0:
            write_report(report, args.out, best_of_n_table(report, title) if args.best_of_n else None)

    if args.best_of_n:
        if world > 1:
            raise ValueError("--best-of-n runs in one process")
        prm = load_model(args.prm, dtype=torch.float32, device=device).eval() if args.prm else None
        report = evaluate_best_of_n(model, tokenizer, tasks, n=args.n, seed=args.seed, samples=args.best_of_n, prm=prm,
                                    temperature=args.temperature, top_k=args.top_k, system_message=args.system or None,
                                    model_name=identity, prm_name=folder_identity(args.prm) if args.prm else None,
                                    previous=previous, on_task=on_task, prm_max_steps=args.prm_max_steps,
                                    max_num=args.max_num, num_frames=args.num_frames)
        table = best_of_n_table(report, title)
        write_report(report, args.out, table)
        print(table)
        return 0
    report = evaluate(model, tokenizer, tasks, n=args.n, seed=args.seed, batch_size=args.batch_size,
                      system_message=args.system or None, rank=rank, world_size=world,
                      model_name=identity, previous=previous, on_task=on_task, max_num=args.max_num,
                      num_frames=args.num_frames, engine=args.engine)
    if rank == 0:
        write_report(report, args.out)
        print(markdown_table(report, f"{args.model}, seed {args.seed}"))
        print(f"written: {args.out} and {Path(args.out).with_suffix('.md')}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    """Paired test of two evaluations on the same questions: REPORT[:METHOD] for each side."""
    from nativevl.eval.runner import compare

    def side(spec: str) -> tuple[dict, str | None]:
        path, method = spec, None
        if not Path(spec).is_file() and ":" in spec:  # REPORT:METHOD (the report's path may hold ':' too)
            path, _, method = spec.rpartition(":")
        if not Path(path).is_file():
            raise FileNotFoundError(f"no evaluation report {path}")
        return json.loads(Path(path).read_text()), method or None

    (a, ma), (b, mb) = side(args.a), side(args.b)
    tasks = [t for t in (args.tasks.split(",") if args.tasks else a) if t in a and t in b]
    if not tasks:
        raise ValueError(f"the two reports share no task ({sorted(a)} / {sorted(b)})")
    rows = []  # every comparison first: a task that cannot be compared is an error, not half a table
    for task in tasks:
        t = compare(a, b, task, ma, mb)
        first = sum(bool(r[ma or "correct"]) for r in a[task]["records"]) / t["n"]
        rows.append(f"| {task} | {first:.3f} | {first + t['difference']:.3f} | {t['difference']:+.3f} | {t['a_only']} | "
                    f"{t['b_only']} | {t['p_value']:.3g} |")
    print(f"| task | {args.a} | {args.b} | difference | only the first right | only the second right | p (exact McNemar) |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    return 0


def cmd_train(args: argparse.Namespace, extra: list[str]) -> int:
    from nativevl.recipes import apply_overrides, check_inputs, launch, recipe

    _log_info()
    run = apply_overrides(recipe(args.recipe), extra)
    check_inputs(args.recipe, run)
    summary = launch(run, args.out)
    print(json.dumps(summary))
    return 0


def cmd_plan(args: argparse.Namespace, extra: list[str]) -> int:
    from nativevl.config import preset
    from nativevl.recipes import apply_overrides, recipe
    from nativevl.train.plan import GiB, advice, format_plan, frozen_in_bf16, param_counts, plan, run_inputs

    run = apply_overrides(recipe(args.recipe), extra)
    if run.model.init_from:
        from nativevl.io.hf import read_config

        cfg = read_config(run.model.init_from)[0]
    else:
        cfg = preset(args.preset or run.model.preset)
    trainable, kw = run_inputs(cfg, run.stage, tokens=run.data.max_tokens, tiles=run.data.max_tiles,
                               loss_chunk=run.train.loss_chunk, gpu_bytes=int(args.gpu_memory * GiB),
                               reference=run.train.objective == "mpo", frozen_bf16=frozen_in_bf16(run))
    counts = param_counts(cfg)
    print(f"{args.recipe}: {sum(counts.values()) / 1e9:.2f}B parameters (ViT {counts['vit'] / 1e6:.0f}M, "
          f"MLP {counts['mlp'] / 1e6:.0f}M, LLM {counts['llm'] / 1e6:.0f}M), {sum(trainable.values()) / 1e9:.2f}B trainable; "
          f"packs of {run.data.max_tokens} tokens and {run.data.max_tiles} tiles, {args.gpus} GPU(s)")
    ac = run.train.activation_checkpointing
    for checkpointing in (ac, not ac):
        p = plan(cfg, trainable, gpus=args.gpus, activation_checkpointing=checkpointing, **kw)
        print(format_plan(p, f"activation checkpointing {'on' if checkpointing else 'off'}"
                             f"{' (the recipe)' if checkpointing == ac else ''}:"))
    hints = advice(cfg, trainable, gpus=args.gpus, activation_checkpointing=ac, **kw)
    for hint in hints:
        print(f"to fit: {hint}")
    return 0 if not hints else 1


ADAPTER_HELP = "a PEFT LoRA adapter folder for --model, merged into its weights on loading"


def _engine_args(p: argparse.ArgumentParser) -> None:
    """The inference engine's options, as chat and serve share them."""
    p.add_argument("--decode-chunk", "--decode_chunk", dest="decode_chunk", type=int, default=1,
                   help="greedy decode steps per device call and host sync (1: stream every token; more: fewer syncs, "
                        "text arrives in bursts)")
    p.add_argument("--decode-attention", "--decode_attention", dest="decode_attention", choices=DECODE_BACKENDS,
                   default="sdpa", help="the decode step's attention kernel: sdpa, or split (Triton split-key, CUDA)")
    p.add_argument("--decode-gemv", "--decode_gemv", dest="decode_gemv", action="store_true",
                   help="compile the decode step with Inductor's coordinate-descent tuning (CUDA): batch-1 matrix "
                        "products become Triton reductions fused with the norms and activations around them; "
                        "slower to compile")
    p.add_argument("--compile-prefill", "--compile_prefill", dest="compile_prefill", action="store_true",
                   help="compile the prefill's decoder layer (one graph for every prompt length; the first "
                        "prompts wait for it): faster time to first token")
    p.add_argument("--no-prefix-cache", "--no_prefix_cache", dest="prefix_cache", action="store_false",
                   help="prefill every prompt whole (default: a prompt starting with the tokens a finished "
                        "sequence's slot still holds, images under the same bytes included, prefills the rest only)")
    p.add_argument("--prefix-min-tokens", "--prefix_min_tokens", dest="prefix_min_tokens", type=int, default=64,
                   help="the fewest kept tokens worth reusing (fewer: the prompt is prefilled with the others)")
    p.add_argument("--vision-cache-mb", "--vision_cache_mb", dest="vision_cache_mb", type=float, default=256,
                   help="MiB of image features kept on the device, so that an image asked about again (a later "
                        "turn, another request with the same bytes or file) skips the ViT; 0: none")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", type=parse_dtype, default=None)


def _check_engine_args(args: argparse.Namespace) -> None:
    """_engine_args' numbers, named by their flags before a model is loaded for them."""
    from nativevl.infer.engine import check_options

    check_options(args.decode_chunk, args.prefix_min_tokens, args.vision_cache_mb,
                  name=lambda key: "--" + key.replace("_", "-"))


def _engine_options(args: argparse.Namespace) -> dict:
    """Engine keyword arguments from _engine_args' options."""
    from nativevl.infer.slot_decoder import GEMV_OPTIONS

    return {"decode_chunk": args.decode_chunk, "decode_attention": args.decode_attention,
            "vision_cache_mb": args.vision_cache_mb, "compile_options": GEMV_OPTIONS if args.decode_gemv else None,
            "compile_prefill": args.compile_prefill, "prefix_cache": args.prefix_cache,
            "prefix_min_tokens": args.prefix_min_tokens}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nativevl", description="InternVL3 in plain PyTorch")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="the whole recipe on the toy world: pre-training, SFT, evaluation (CPU, no download)")
    d.add_argument("--out", default="runs/demo", help="output folder (report.json, report.md, loss.png, model)")
    d.add_argument("--quick", action="store_true", help="a few steps per stage (checks the pipeline, learns nothing)")
    d.set_defaults(func=cmd_demo)

    cmp_ = sub.add_parser("compare", help="paired test of two evaluations on the same questions (exact McNemar)")
    cmp_.add_argument("a", help="an eval report (json), or REPORT:METHOD for a Best-of-N report (e.g. best.json:pass1)")
    cmp_.add_argument("b", help="the other side, the same way (the same report may be both)")
    cmp_.add_argument("--tasks", default=None, help="comma-separated (default: every task both reports have)")
    cmp_.set_defaults(func=cmd_compare)

    e = sub.add_parser("eval", help="evaluate a checkpoint on toy-world tasks and benchmark files (accuracy, chance, 95%% interval)")
    e.add_argument("--model", required=True)
    e.add_argument("--tokenizer", default=None, help="default: the model folder")
    e.add_argument("--adapter", default=None, help=ADAPTER_HELP)
    e.add_argument("--tasks", default="shapes,reading,charts,arithmetic,multi_image,text",
                   help="comma-separated: toy-world families, and benchmark files (VLMEvalKit .tsv: MMBench, "
                        "MMStar, AI2D, TextVQA, ...; InternVL conversation .jsonl: a custom set)")
    e.add_argument("--max_num", type=int, default=None,
                   help="tiles per question for benchmark files, shared by its images (as chat/serve); default: as "
                        "InternVL's VLMEvalKit model tiles each file (6-24 per image by its name, 64 at most); "
                        "toy tasks use 1")
    e.add_argument("--num_frames", type=int, default=8,
                   help="frames of a .jsonl file's video questions (segment centres, one tile each; default 8)")
    # --num_questions: under torchrun, whose own parser takes --n for an abbreviation of its --nnodes ...
    e.add_argument("--n", "--num_questions", dest="n", type=int, default=None,
                   help="questions per task (default: 200 of each toy task, every question of a benchmark file); "
                        "under torchrun spell it --num_questions")
    e.add_argument("--seed", type=int, default=10_000, help="held-out generator seed")
    e.add_argument("--batch_size", type=int, default=32)
    e.add_argument("--engine", action="store_true",
                   help="decode with the inference engine (as serve: continuous batching of --batch_size rows, CUDA "
                        "graphs on a GPU, a picture asked again taken from its vision cache) instead of plain "
                        "batched generate; the same greedy answers")
    e.add_argument("--system", default="", help="system message ('' for none, as the demo trains)")
    e.add_argument("--out", default="eval.json")
    e.add_argument("--resume", action="store_true",
                   help="keep the tasks --out already holds from a run with the same model, tokenizer (the same "
                        "files) and settings; its tasks of other settings are dropped")
    e.add_argument("--best-of-n", "--best_of_n", dest="best_of_n", type=int, default=0,
                   help="test-time scaling: N samples per question (one prefill), majority vote and, with --prm, PRM pick")
    e.add_argument("--prm", default=None, help="process reward model folder (nativevl train prm)")
    e.add_argument("--temperature", type=float, default=0.7, help="sampling temperature for --best-of-n")
    e.add_argument("--top_k", type=int, default=0, help="top-k for --best-of-n (0: none)")
    e.add_argument("--prm_max_steps", type=int, default=12,
                   help="the PRM scores at most this many steps per solution, as its data (nativevl data prm --max_steps)")
    e.set_defaults(func=cmd_eval)

    c = sub.add_parser("chat", help="chat about images and videos: one --prompt, or a multi-turn session (/image PATH, "
                                     "/video PATH, /reset)")
    c.add_argument("--model", required=True, help="checkpoint folder (-hf or original layout) with tokenizer files")
    c.add_argument("--adapter", default=None, help=ADAPTER_HELP)
    c.add_argument("--image", action="append", default=None, help="image file, repeatable (omit for text only)")
    c.add_argument("--video", default=None, help="video file: --num_frames frames at segment centres, one tile each")
    c.add_argument("--num_frames", type=int, default=8, help="frames taken from a video (default 8, as InternVL's "
                                                             "chat examples)")
    c.add_argument("--prompt", default=None, help="answer this and exit (default: interactive, reads stdin)")
    c.add_argument("--system", default=None, help="system message (default: InternVL's; '' for none)")
    c.add_argument("--max_new_tokens", type=int, default=256)
    c.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    c.add_argument("--top_p", type=float, default=1.0)
    c.add_argument("--seed", type=int, default=None)
    c.add_argument("--max_num", type=int, default=12, help="max tiles per message (dynamic resolution), shared by its images")
    c.add_argument("--max_seq_len", type=int, default=8192, help="conversation length the KV cache holds")
    _engine_args(c)
    c.set_defaults(func=cmd_chat)

    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/chat/completions, /v1/models, /health)")
    s.add_argument("--model", required=True, help="checkpoint folder with tokenizer files")
    s.add_argument("--adapter", default=None, help=ADAPTER_HELP)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--name", default=None, help="model id clients send (default: the folder name)")
    s.add_argument("--allowed-local-media", "--allowed_local_media", dest="allowed_local_media", default=None,
                   help="folder whose image files requests may name (default: only base64 data URLs)")
    s.add_argument("--max-queue", "--max_queue", dest="max_queue", type=int, default=256,
                   help="waiting requests beyond this get 429")
    s.add_argument("--max-batch-size", "--max_batch_size", dest="max_batch_size", type=int, default=32,
                   help="sequences decoded together (KV cache slots)")
    s.add_argument("--max-seq-len", "--max_seq_len", dest="max_seq_len", type=int, default=8192)
    s.add_argument("--max-prompt-tokens", "--max_prompt_tokens", dest="max_prompt_tokens", type=int, default=8000)
    s.add_argument("--max-images", "--max_images", dest="max_images", type=int, default=8)
    s.add_argument("--max-image-pixels", "--max_image_pixels", dest="max_image_pixels", type=int, default=4096 * 4096)
    s.add_argument("--max-body-bytes", "--max_body_bytes", dest="max_body_bytes", type=parse_size, default="32MB")
    s.add_argument("--max_num", type=int, default=12, help="max tiles per request, shared by its images (a "
                   "video's frames, one tile each, are not counted: --max-video-frames bounds them)")
    s.add_argument("--max-videos", "--max_videos", dest="max_videos", type=int, default=1,
                   help="video_url parts a request may hold")
    s.add_argument("--num_frames", "--num-frames", dest="num_frames", type=int, default=8,
                   help="frames taken from a video (segment centres, one tile each) unless its part asks otherwise")
    s.add_argument("--max-video-frames", "--max_video_frames", dest="max_video_frames", type=int, default=32,
                   help="the most frames a video_url part's num_frames may ask")
    s.add_argument("--system", default=None, help="system message when a request has none (default: InternVL's)")
    s.add_argument("--no-cuda-graphs", dest="no_cuda_graphs", action="store_true")
    _engine_args(s)
    s.set_defaults(func=cmd_serve)

    v = sub.add_parser("convert", help="convert a checkpoint between the -hf and original InternVL layouts "
                                       "(optionally with a LoRA adapter merged)")
    v.add_argument("src")
    v.add_argument("dst")
    v.add_argument("--to", required=True, choices=["hf", "internvl"])
    v.add_argument("--adapter", default=None, help="a PEFT LoRA adapter folder for src, merged into the weights written")
    v.add_argument("--dtype", type=parse_dtype, default=None, help="cast floating tensors (default: keep)")
    v.add_argument("--max_shard_size", type=parse_size, default=parse_size("5GB"))
    v.set_defaults(func=cmd_convert)

    q = sub.add_parser("quantize", help="weight-only quantization of the LLM (compressed-tensors W4A16 / W8A16, "
                                        "as llm-compressor writes and vLLM serves)")
    q.add_argument("src", help="checkpoint folder (either layout)")
    q.add_argument("dst", help="output folder (-hf layout)")
    q.add_argument("--scheme", choices=["w4a16", "w8a16"], default="w4a16",
                   help="w4a16: 4-bit weights in groups; w8a16: 8-bit, one scale per output channel")
    q.add_argument("--group_size", type=int, default=None,
                   help="input columns per scale for w4a16 (default 128; 0 or -1: one scale per output channel); "
                        "w8a16 is always per channel")
    q.add_argument("--calib", default=None,
                   help="InternVL meta json of calibration data: GPTQ on its records (default: round to nearest)")
    q.add_argument("--calib_records", type=int, default=128, help="calibration records read from --calib")
    q.add_argument("--calib_max_tokens", type=int, default=4096, help="tokens per calibration pack")
    q.add_argument("--device", default=None, help="where GPTQ runs (default: cuda if available)")
    q.add_argument("--max_shard_size", type=parse_size, default=parse_size("5GB"))
    q.set_defaults(func=cmd_quantize)

    t = sub.add_parser("train", help="train a recipe; run the same command again to resume",
                       epilog="any field of the recipe can be overridden: --max_steps=100 --stage.vit.mode=frozen --meta=data/meta.json")
    t.add_argument("recipe", help="debug_tiny, pretrain, sft, sft_lora, sft_qlora, internvl3_1b_sft, mpo, prm")
    t.add_argument("--out", required=True, help="run folder (checkpoints, metrics, final export)")
    t.set_defaults(func=cmd_train, takes_extra=True)

    pl = sub.add_parser("plan", help="memory per GPU for a recipe (parameters, gradients, optimizer, activations)",
                        epilog="recipe overrides as for train: --max_tokens=8192 --activation_checkpointing=true")
    pl.add_argument("recipe")
    pl.add_argument("--gpus", type=int, default=1, help="GPUs sharing the model (FSDP2)")
    pl.add_argument("--gpu_memory", type=float, default=80.0, help="GiB per GPU")
    pl.add_argument("--preset", default=None, help="model preset (default: the recipe's)")
    pl.set_defaults(func=cmd_plan, takes_extra=True)

    data = sub.add_parser("data", help="dataset tools").add_subparsers(dest="data_command", required=True)
    dv = data.add_parser("validate", help="read a whole dataset; report bad records by kind; exit 1 if any")
    dv.add_argument("meta", help="InternVL meta json")
    dv.add_argument("--tokenizer", default=None, help="tokenizer folder (a checkpoint) to check lengths")
    dv.add_argument("--max_tokens", type=int, default=16384)
    dv.add_argument("--max_tiles", type=int, default=48)
    dv.add_argument("--image_seq_length", type=int, default=256)
    dv.add_argument("--examples", type=int, default=3, help="examples shown per problem kind")
    dv.add_argument("--system", default=None, help="system message the lengths count (default: InternVL's; '' for none)")
    dv.set_defaults(func=cmd_data_validate)
    dc = data.add_parser("convert", help="ShareGPT / LLaVA, OpenAI / ms-swift, LLaMA-Factory (alpaca, sharegpt) data "
                                          "-> InternVL jsonl + meta.json; refused records to OUT.rejects.jsonl")
    dc.add_argument("input", nargs="*", help=".jsonl, .json (a list, columns or JSON Lines) or .parquet files, "
                                             "or folders of them")
    dc.add_argument("--out", required=True, help="output .jsonl (meta.json and embedded images go beside it)")
    dc.add_argument("--dataset_info", default=None, help="LLaMA-Factory's dataset_info.json: read --dataset as it declares")
    dc.add_argument("--dataset", default=None, help="the dataset_info.json entry to convert")
    dc.add_argument("--image_root", default=None,
                    help="folder relative image paths start from (default: the input's folder; the dataset_info.json "
                         "folder with --dataset_info); then the current folder")
    dc.add_argument("--max_reject_fraction", type=float, default=0.05,
                    help="stop (writing nothing but the rejects) when more records than this are refused")
    dc.add_argument("--max_dynamic_patch", type=int, default=None,
                    help="the meta entry's tile cap per sample (default: 12, or what an existing entry for --out says)")
    dc.add_argument("--data_augment", action="store_true", default=None,
                    help="the meta entry's JPEG re-encoding in training (default: off, or what an existing entry says)")
    dc.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    dc.add_argument("--examples", type=int, default=3, help="examples shown per refused kind")
    dc.add_argument("--val_fraction", type=float, default=0.0,
                    help="share of the records held out to OUT_val.jsonl, listed in meta_val.json (for --val_meta)")
    dc.add_argument("--seed", type=int, default=0, help="which records --val_fraction holds out")
    dc.set_defaults(func=cmd_data_convert)
    for name, helptext in (("preference", "sample N responses per question, verify them, write MPO preference pairs"),
                           ("prm", "label solution steps by Monte Carlo rollouts: PRM training conversations")):
        dp = data.add_parser(name, help=helptext)
        dp.add_argument("--model", required=True, help="the policy (checkpoint folder with tokenizer files)")
        dp.add_argument("--toyworld", default=None, help="questions from a toy-world family (e.g. arithmetic)")
        dp.add_argument("--input", default=None, help="or InternVL conversation jsonl (first human turn = question, its answer = ground truth)")
        dp.add_argument("--root", default=None, help="image folder of --input (default: its folder)")
        dp.add_argument("--n", type=int, default=1000, help="questions (with --input: its first N records)")
        dp.add_argument("--seed", type=int, default=0, help="question and sampling seed (keep apart from eval seeds)")
        dp.add_argument("--top_k", type=int, default=50)
        dp.add_argument("--max_new_tokens", type=int, default=256)
        dp.add_argument("--system", default="", help="system message ('' for none, as the toy world trains)")
        dp.add_argument("--out", required=True, help="output .jsonl (images and meta.json go beside it)")
        dp.add_argument("--num_frames", type=int, default=8, help="frames a video question is asked with")
        dp.add_argument("--resume", action="store_true",
                        help="continue an interrupted run: reuse the sampling it kept beside --out (same model and "
                             "settings); without it, such progress is an error rather than overwritten")
    dpp = data.choices["preference"]
    dpp.add_argument("--samples", type=int, default=32, help="responses per question")
    dpp.add_argument("--temperature", type=float, default=0.7)
    dpp.add_argument("--max_pairs", type=int, default=15, help="pairs per question")
    dpp.add_argument("--dropout_ratio", type=float, default=0.5, help="DropoutNTP cut for questions without ground truth")
    dpp.set_defaults(func=cmd_data_preference)
    dpr = data.choices["prm"]
    dpr.add_argument("--solutions", type=int, default=4, help="sampled solutions per question")
    dpr.add_argument("--rollouts", type=int, default=16, help="continuations per step prefix")
    dpr.add_argument("--temperature", type=float, default=1.0, help="rollout temperature")
    dpr.add_argument("--max_steps", type=int, default=12)
    dpr.set_defaults(func=cmd_data_prm)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "takes_extra", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    finished = False
    try:
        code = args.func(args, extra) if getattr(args, "takes_extra", False) else args.func(args)
        finished = True
        return code
    except BrokenPipeError as e:
        if _stdout_reader_gone():  # `nativevl ... | head`: the rest of the output goes nowhere
            finished = True
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nor does the flush at exit complain
            return 141  # as a shell's pipeline reports a writer stopped by SIGPIPE
        print(f"nativevl {args.command}: error: {e}", file=sys.stderr)  # another pipe than stdout broke
        return 2
    except (ValueError, OSError) as e:  # a bad value, a missing file, a path through a file, ...
        print(f"nativevl {args.command}: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # a run that stopped itself (non-finite loss, too many bad records): its message
        from nativevl.data.convert import ConversionAborted
        from nativevl.data.pipeline import TooManyBadRecords
        from nativevl.train.checkpoint import CheckpointNotSaved
        from nativevl.train.loop import NonFiniteLoss
        from nativevl.train.watch import Interrupted, OutOfMemory

        if not isinstance(e, (NonFiniteLoss, TooManyBadRecords, ConversionAborted, Interrupted, OutOfMemory,
                              CheckpointNotSaved)):
            raise
        msg = str(e)
        if "Original Traceback" in msg:  # raised in a DataLoader worker: the original message is the last line
            msg = msg.strip().splitlines()[-1].split(": ", 1)[-1]
        print(f"nativevl {args.command}: stopped: {msg}", file=sys.stderr)
        return 1
    finally:
        end_process_group(together=finished)


def _stdout_reader_gone() -> bool:
    """Whether stdout is a pipe whose reading end is closed (poll reports an error on it)."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(event & select.POLLERR for _, event in poller.poll(0))
    except (AttributeError, ValueError, OSError):  # no poll (Windows), no file descriptor (a captured stdout)
        return False


def end_process_group(together: bool = False) -> None:
    """Under torchrun: the process group ends with the command. A process that exits with the group's
    threads (gloo, NCCL) still running can abort at exit and turn a finished run into a failed one.
    `together` (every rank finished): they wait for each other first, so that no rank tears its
    connections down while another still reads from them (a rank that failed does not wait: torchrun
    stops the others)."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        if together:
            dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
