"""Decoding throughput: nativevl's Engine vs transformers' generate, same random weights, same prompts, one run.

Greedy, text prompts of --prompt-len random tokens, exactly --new-tokens generated per sequence (no
early stop); tokens/s = batch x new tokens / wall time of the whole call (prefill included), for each
batch size, and the ratio. The engine's decode-only rate (first token to last) is printed beside.
    PYTHONPATH=src python3 benchmarks/decode.py [--shape tiny|internvl3_1b] [--device cpu|cuda]
        [--dtype float32|bfloat16] [--prompt-len 512] [--new-tokens N] [--batch-sizes 1,32] [--json OUT]
        [--no-fused-decode] (the engine's reference decode step and prefill, for comparison)
        [--variants base,chunk8,split,chunk8+split,chunk8+gemv,chunk8+autotune] [--profile chunk8]
--variants times several engine configurations in the one run (each its own Engine on the same
weights), each against the same transformers figure: `base` is the default engine; `chunkN` runs up
to N greedy decode steps per graph replay and host sync (Engine's decode_chunk); `autotune` compiles
the decode step with mode "max-autotune-no-cudagraphs" (Inductor tries Triton kernels against
cuBLAS for every matmul shape; slow to compile); `split` runs the decode step's attention with the
Triton split-key kernel (decode_attention="split"); `gemv` compiles it with Inductor's
coordinate-descent tuning (slot_decoder.GEMV_OPTIONS, `--decode-gemv`: batch-1 matrix products as
Triton reductions fused with the ops around them; not with `autotune`); `cprefill` compiles the
prefill's decoder layer (compile_prefill, `--compile-prefill`). --profile VARIANTS adds a torch.profiler breakdown
of one more batch-1 request per variant: GPU kernel time and kernels run against wall time, and where
the GPU sat idle (inside CUDA-graph replays, after host syncs, waiting for launches: profiling.idle_gaps);
--trace-dir DIR keeps those requests' traces.
One side failing (an exception) is reported and does not lose the other side's numbers. The engine's
prefix reuse is off (the timed request repeats the warm-up's prompt, whose keys it would otherwise
find kept: transformers prefills it whole).
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import tempfile
import time
import traceback

import torch
from profiling import profile_call, trace_name, write_json  # benchmarks/profiling.py, beside this script

from nativevl import VisionLanguageModel
from nativevl.config import preset
from nativevl.infer.engine import Engine, SamplingParams
from nativevl.infer.slot_decoder import GEMV_OPTIONS
from nativevl.io.hf_config import config_to_hf


def variant_options(name: str) -> dict:
    """Engine keyword arguments of a variant name: base, chunkN, autotune, split, gemv, cprefill, joined
    by '+'."""
    opts: dict = {}
    for part in name.split("+"):
        if part == "base":
            continue
        if part.startswith("chunk") and part[5:].isdigit():
            opts["decode_chunk"] = int(part[5:])
        elif part == "autotune":
            opts["compile_mode"] = "max-autotune-no-cudagraphs"
        elif part == "split":
            opts["decode_attention"] = "split"
        elif part == "gemv":
            opts["compile_options"] = GEMV_OPTIONS
        elif part == "cprefill":
            opts["compile_prefill"] = True
        else:
            raise SystemExit(f"unknown variant part {part!r} in {name!r} (base, chunkN, autotune, split, gemv, cprefill, joined by '+')")
    return opts


def tiny_shape():
    """InternVL3-1B's structure at CPU size: 4 LLM layers of width 256 (GQA 4:1), 16k vocabulary, a 2-layer ViT."""
    cfg = preset("internvl3_1b")
    vision = dataclasses.replace(cfg.vision, num_hidden_layers=2, hidden_size=128, intermediate_size=512,
                                 num_attention_heads=2)
    text = dataclasses.replace(cfg.text, num_hidden_layers=4, hidden_size=256, intermediate_size=1024,
                               num_attention_heads=8, num_key_value_heads=2, vocab_size=16000, bos_token_id=1,
                               eos_token_id=2, pad_token_id=0)
    return dataclasses.replace(cfg, vision=vision, text=text, image_token_id=15999)


def build(shape: str, device: str, dtype: torch.dtype, **overrides):
    """transformers' model with random weights, and ours loaded from its saved copy; `overrides` replace
    fields of the shape's ModelConfig (e.g. image_token_id, to match a tokenizer)."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    cfg = tiny_shape() if shape == "tiny" else preset(shape)
    cfg = dataclasses.replace(cfg, **overrides)
    torch.manual_seed(0)
    theirs = InternVLForConditionalGeneration(InternVLConfig(**config_to_hf(cfg))).eval().to(dtype)
    with tempfile.TemporaryDirectory() as tmp:
        theirs.save_pretrained(tmp)
        ours = VisionLanguageModel.from_pretrained(tmp, dtype=dtype, device=device)
    return cfg, theirs.to(device), ours


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="tiny", help="tiny (CPU) or a preset name, e.g. internvl3_1b")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=None, help="default: 128 on cuda, 32 on cpu")
    ap.add_argument("--batch-sizes", default="1,32")
    ap.add_argument("--no-cuda-graphs", action="store_true")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--no-fused-decode", action="store_true", help="the engine's reference step (the model's layers)")
    ap.add_argument("--variants", default="base", help="comma-separated engine configurations (see above)")
    ap.add_argument("--profile", default="", help="comma-separated variants to profile on one batch-1 request")
    ap.add_argument("--trace-dir", default=None, help="keep each profiled request's trace here (gzipped Chrome trace)")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()
    variants = [v for v in args.variants.split(",") if v]
    options = {v: variant_options(v) for v in variants}
    cuda = args.device.startswith("cuda")
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    new = args.new_tokens or (128 if cuda else 32)
    batches = [int(b) for b in args.batch_sizes.split(",")]
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    import transformers

    t0 = time.perf_counter()
    cfg, theirs, ours = build(args.shape, args.device, dtype)
    print(f"built {args.shape} in {time.perf_counter() - t0:.1f}s: {sum(p.numel() for p in ours.parameters()) / 1e6:.1f}M "
          f"parameters, {args.device} {dtype}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{platform.processor() or platform.machine()}")
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(10, cfg.image_token_id - 10, (max(batches), args.prompt_len), generator=g)
    never = cfg.text.vocab_size + 1  # an eos id no token can equal: every row generates `new` tokens
    params = SamplingParams(max_tokens=new, ignore_eos=True)
    engines: dict[str, Engine] = {}
    failed: dict[str, int] = {}  # variant -> the batch size at which it failed
    results: dict = {"shape": args.shape, "device": args.device, "dtype": str(dtype).removeprefix("torch."),
                     "torch": torch.__version__, "transformers": transformers.__version__,
                     "gpu": torch.cuda.get_device_name() if cuda else None, "prompt_len": args.prompt_len,
                     "new_tokens": new, "variants": variants, "batches": {}}

    def save() -> None:  # after every batch size and profile: a run cut short keeps what it measured
        if args.json:
            write_json(args.json, results)

    profiled = [v for v in args.profile.split(",") if v]

    def profile(v: str) -> None:
        """One batch-1 request of variant v under the profiler (its kernels, and where the GPU waits)."""
        engine, one = engines[v], prompts[:1].tolist()
        stats = dict(engine.stats)
        try:
            trace = trace_name(args.trace_dir, f"decode-{v}") if args.trace_dir else None
            prof = profile_call(lambda engine=engine, one=one: engine.generate(one, params), torch.device(args.device),
                                label=f"{v}, one batch-1 request of {new} tokens", trace=trace)
        except Exception as e:  # noqa: BLE001 - the other variants' profiles still count
            traceback.print_exc()
            results.setdefault("profiles", {})[v] = {"error": f"{type(e).__name__}: {e}"}
            save()
            return
        prof["decode_calls"] = engine.stats["decode_calls"] - stats["decode_calls"]
        print(f"    {prof['decode_calls']} decode calls, {prof['kernels'] / max(new, 1):.0f} kernels run per token")
        results.setdefault("profiles", {})[v] = prof
        save()

    for b in batches:
        row: dict = {}
        ids = prompts[:b].to(args.device)
        for v in variants:  # ours
            key = "" if v == "base" else f"{v}_"
            if v in failed:  # its engine failed at a smaller batch: its state is not to be trusted
                row[f"{key}ours_error"] = f"skipped: failed at batch {failed[v]}"
                continue
            try:
                if v not in engines:
                    engines[v] = Engine(ours, None, max_batch_size=max(batches), max_seq_len=args.prompt_len + new + 8,
                                        cuda_graphs=not args.no_cuda_graphs, compile=False if args.no_compile else None,
                                        fused_decode=not args.no_fused_decode, prefix_cache=False, **options[v])
                engine = engines[v]
                lists = ids.tolist()
                t0 = time.perf_counter()
                engine.generate(lists, params)  # warm-up: compiles and captures this batch's graphs
                row[f"{key}ours_warmup_s"] = time.perf_counter() - t0
                reqs = [engine.submit(x, params) for x in lists]
                sync()
                t0 = time.perf_counter()
                while not all(r.done for r in reqs):
                    engine.step()
                sync()
                wall = time.perf_counter() - t0
                first = max(r.timings["first_token"] for r in reqs)
                last = max(r.timings["finished"] for r in reqs)
                row[f"{key}ours_tok_s"] = b * new / wall
                row[f"{key}ours_decode_tok_s"] = b * (new - 1) / (last - first)
                row[f"{key}ours_prefill_ms"] = 1e3 * (first - t0)
                row[f"{key}ours_tokens"] = reqs[0].result()[0].token_ids
                row[f"{key}decode_mode"] = engine.stats["decode_mode"]
                if b == 1 and v in profiled:  # now, while it is warm: a run cut short by its limit keeps it
                    print(f"batch 1 {v}: {row[f'{key}ours_tok_s']:.1f} tok/s")
                    profile(v)
            except Exception as e:  # noqa: BLE001 - one side failing must not lose the other's figures
                traceback.print_exc()
                row[f"{key}ours_error"] = f"{type(e).__name__}: {e}"
                failed[v] = b
                engines.pop(v, None)
        try:  # transformers
            mask = torch.ones_like(ids)
            kw = {"input_ids": ids, "attention_mask": mask, "do_sample": False, "eos_token_id": never, "pad_token_id": 0}
            with torch.no_grad():
                theirs.generate(max_new_tokens=2, **kw)  # warm-up
                sync()
                t0 = time.perf_counter()
                out = theirs.generate(max_new_tokens=new, min_new_tokens=new, **kw)
                sync()
            row["theirs_tok_s"] = b * new / (time.perf_counter() - t0)
            row["theirs_tokens"] = out[0, args.prompt_len:].tolist()
        except Exception as e:  # noqa: BLE001 - as above
            traceback.print_exc()
            row["theirs_error"] = f"{type(e).__name__}: {e}"
        for v in variants:
            key = "" if v == "base" else f"{v}_"
            if f"{key}ours_tok_s" in row and "theirs_tok_s" in row:
                row[f"{key}ratio"] = row[f"{key}ours_tok_s"] / row["theirs_tok_s"]
                a, t = row[f"{key}ours_tokens"], row["theirs_tokens"]
                row[f"{key}same_greedy_prefix"] = next((i for i, (x, y) in enumerate(zip(a, t)) if x != y),
                                                       min(len(a), len(t)))
            if key and f"{key}ours_tokens" in row and "ours_tokens" in row:  # every variant decodes the same tokens
                row[f"{key}same_as_base"] = row[f"{key}ours_tokens"] == row["ours_tokens"]
            fmt = lambda k, row=row: f"{row[k]:10.1f}" if k in row else f"{'failed':>10s}"
            ratio = f"{row[key + 'ratio']:6.2f}x" if key + "ratio" in row else "     -"
            print(f"batch {b:3d} {v:>18s}: nativevl {fmt(key + 'ours_tok_s')} tok/s (decode only "
                  f"{fmt(key + 'ours_decode_tok_s')}, prefill {fmt(key + 'ours_prefill_ms')} ms), "
                  f"transformers {fmt('theirs_tok_s')} tok/s, ratio {ratio}, greedy tokens agree for "
                  f"{row.get(key + 'same_greedy_prefix', '-')} of {new}"
                  + (f" (same as base: {row[key + 'same_as_base']})" if key + "same_as_base" in row else "")
                  + f", mode {row.get(key + 'decode_mode')}")
        for k in [k for k in row if k.endswith("_tokens") and isinstance(row[k], list)]:
            row.pop(k)
        results["batches"][str(b)] = row
        save()
    for v in profiled:  # those not profiled at batch 1 (no batch 1 asked, or it failed)
        if v in results.get("profiles", {}):
            continue
        if v not in engines:
            print(f"  profile: {v} is not among the variants that ran")
            continue
        profile(v)
    results["engine_stats"] = {v: dict(e.stats) for v, e in engines.items()}
    save()
    if args.json:
        print(f"written {args.json}")


if __name__ == "__main__":
    main()
