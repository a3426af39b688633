"""`nativevl data ...`: validate a dataset, convert other trainers' data, and the model-in-the-loop
pipelines (preference pairs, PRM labels). The parser is cli.py's."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch


def cmd_data_validate(args: argparse.Namespace) -> int:
    from nativevl.data.pipeline import DataConfig
    from nativevl.data.records import load_meta
    from nativevl.data.template import DEFAULT_SYSTEM_MESSAGE
    from nativevl.data.validate import validate
    from nativevl.io.tokenizer import load_tokenizer

    specs = load_meta(args.meta)
    tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else None
    cfg = DataConfig(
        max_tokens=args.max_tokens,
        max_tiles=args.max_tiles,
        image_seq_length=args.image_seq_length,
        image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>") if tokenizer else 151667,
        system_message=DEFAULT_SYSTEM_MESSAGE if args.system is None else (args.system or None),
        training=False,
    )
    report = validate(specs, tokenizer, cfg, examples=args.examples)
    print(report.format())
    if tokenizer is None:
        print("(no --tokenizer: token lengths and image-token counts were not checked)")
    return 1 if report.bad else 0


def cmd_data_convert(args: argparse.Namespace) -> int:
    from nativevl.data.convert import Layout, convert
    from nativevl.data.records import meta_entry_reading, read_meta_entries

    layout, inputs = Layout(), [Path(p) for p in args.input]
    image_root = Path(args.image_root) if args.image_root else None
    if args.dataset_info:  # LLaMA-Factory: the entry's columns, tags and file; media under the dataset folder
        if not args.dataset:
            raise ValueError("--dataset_info needs --dataset NAME (the entry to convert)")
        layout, data_file = Layout.from_dataset_info(args.dataset_info, args.dataset)
        inputs = inputs or [data_file]
        image_root = image_root or Path(args.dataset_info).parent
    elif args.dataset:
        raise ValueError("--dataset names an entry of --dataset_info; give that file too")
    if not inputs:
        raise ValueError("give the data file(s) to convert, or --dataset_info FILE --dataset NAME")
    stats = convert(inputs, Path(args.out), layout, image_root=image_root, max_reject_fraction=args.max_reject_fraction,
                    max_dynamic_patch=args.max_dynamic_patch, data_augment=args.data_augment, overwrite=args.overwrite,
                    examples=args.examples, val_fraction=args.val_fraction, seed=args.seed)
    print(stats.format())
    out = Path(args.out)
    name = meta_entry_reading(read_meta_entries(out.parent / "meta.json"), out.parent / "meta.json", out)
    print(f"written: {out} and {out.parent / 'meta.json'} (dataset {name!r})"
          + (f"; refused records: {out.with_name(out.stem + '.rejects.jsonl')}" if stats.bad else ""))
    if stats.held_out:
        print(f"held out: {out.with_name(out.stem + '_val.jsonl')} in {out.parent / 'meta_val.json'} "
              f"(nativevl train ... --val_meta {out.parent / 'meta_val.json'})")
    print(f"next: nativevl data validate {out.parent / 'meta.json'} --tokenizer MODEL_DIR (decodes every image, counts tokens)")
    return 0


def _questions(args: argparse.Namespace):
    from nativevl.pipelines.questions import jsonl_questions, toyworld_questions

    if bool(args.toyworld) == bool(args.input):
        raise ValueError("give exactly one of --toyworld FAMILY and --input FILE.jsonl")
    if args.toyworld:
        return toyworld_questions(args.toyworld, args.seed, args.n)
    questions = jsonl_questions(args.input, args.root, limit=args.n, videos=True)
    if len(questions) < args.n:
        print(f"{args.input}: {len(questions)} question(s), fewer than --n {args.n}: using all of them", file=sys.stderr)
    return questions


def _policy(args: argparse.Namespace):
    from nativevl.io.hf import load_model
    from nativevl.io.tokenizer import load_tokenizer
    from nativevl.train.parallel import init_distributed

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # every rank would write the same --out and progress files
        raise ValueError(f"data {args.data_command} runs in one process, not under torchrun (WORLD_SIZE "
                         f"{os.environ['WORLD_SIZE']}); run one command per GPU with its own --input and --out")
    _, _, device = init_distributed()
    torch.manual_seed(args.seed)
    return load_model(args.model, dtype=torch.float32, device=device).eval(), load_tokenizer(args.model)


def _progress(args: argparse.Namespace):
    """Sampling kept beside --out as it finishes; --resume continues an interrupted run."""
    from nativevl.eval.runner import folder_identity
    from nativevl.pipelines.questions import Progress

    return Progress(args.out, folder_identity(args.model), resume=args.resume)


def _run_pipeline(args: argparse.Namespace, build, cfg) -> int:
    """A pipeline's run: a damaged meta.json beside --out and a bad --input fail before the model loads
    and the sampling starts; the output is listed in that meta.json."""
    from nativevl.data.records import read_meta_entries

    read_meta_entries(Path(args.out).parent / "meta.json")
    questions = _questions(args)
    model, tokenizer = _policy(args)
    stats = build(model, tokenizer, questions, cfg, args.out, system_message=args.system or None,
                  progress=_progress(args))
    _write_meta(Path(args.out))
    print(json.dumps(stats))
    return 0


def cmd_data_preference(args: argparse.Namespace) -> int:
    from nativevl.pipelines.preference import PreferenceConfig, build_preference_data

    cfg = PreferenceConfig(n=args.samples, temperature=args.temperature, top_k=args.top_k, max_pairs=args.max_pairs,
                           max_new_tokens=args.max_new_tokens, dropout_ratio=args.dropout_ratio, seed=args.seed,
                           num_frames=args.num_frames)
    return _run_pipeline(args, build_preference_data, cfg)


def cmd_data_prm(args: argparse.Namespace) -> int:
    from nativevl.pipelines.prm_labels import PRMDataConfig, build_prm_data

    cfg = PRMDataConfig(solutions=args.solutions, rollouts=args.rollouts, temperature=args.temperature,
                        top_k=args.top_k, max_steps=args.max_steps, max_new_tokens=args.max_new_tokens, seed=args.seed,
                        num_frames=args.num_frames)
    return _run_pipeline(args, build_prm_data, cfg)


def _write_meta(jsonl: Path) -> None:
    """A meta json beside the generated jsonl, so `nativevl train ... --meta` can read it; the datasets
    other runs wrote into the same folder's meta.json stay listed."""
    from nativevl.data.records import write_meta_entry

    meta = write_meta_entry(jsonl, max_dynamic_patch=1)
    print(f"written: {jsonl} and {meta}")
