"""Training throughput: our packed training vs transformers' InternVLForConditionalGeneration with
padded batches, same random weights, same seeded stream of samples, same optimiser, one run.

The stream mixes lengths and images: 128 to 4,096 tokens per sample (log-uniform), 0 to 13 tiles
(a third text-only), the second half of each sample's text labelled. Every optimiser step takes the
next samples up to --step_tokens real tokens; both sides see exactly those samples:
- ours: one pack (cu_seqlens, positions restarting per sample), varlen (or flex / sdpa) attention,
  logits only at labelled positions in chunks, optional torch.compile per block;
- transformers: micro-batches of --hf_batch samples in stream order, right-padded, sdpa, logits
  everywhere, the same token-sum cross-entropy.
Both: fp32 master weights under bf16 autocast (on CUDA), fused AdamW, gradient clipping at 1.
Tokens/s count real (non-pad) tokens; MFU counts ViT + MLP + LLM (train/metrics.py) against the
card's dense bf16 peak (H100 / H200 SXM: 989.4 TFLOP/s). Pixel tensors are made (on the device) before
the clock starts, for both sides: in training a data loader prepares them beside the GPU.

Ours runs in one or more --variants, each on a fresh model (and fresh torch.compile caches), so one
run shows before and after (losses must agree within bf16 noise):
- base: the single-GPU path of train/loop.py as it was: plain module, default CUDA caching allocator;
- fast: the same with growable allocator segments (expandable_segments, which `init_distributed` now
  sets for training runs): packs change shape every step, which fragments fixed-size segments;
- fsdp: fast, plus FSDP2 on one GPU (train/parallel.py, as under torchrun): bf16 compute copies of the
  fp32 master weights, so activations and the residual stream are bf16, gradients reduced in fp32.
Per variant it prints recompilations inside the timed steps, allocator retries and reserved memory;
--profile VARIANT adds a one-step CUDA kernel breakdown (matmul / attention / elementwise / optimizer)
and where the GPU sat idle in that step: after which host sync, or while the host launched what
(profiling.idle_gaps, with this project's Python lines); --trace-dir DIR keeps that step's trace.

    PYTHONPATH=src python3 benchmarks/train_throughput.py --shape internvl3_2b --device cuda --steps 8  # fast only
    PYTHONPATH=src python3 benchmarks/train_throughput.py --shape internvl3_2b --device cuda --steps 8 \
        --variants base,fast,fsdp --profile fast
    PYTHONPATH=src python3 benchmarks/train_throughput.py --shape tiny --device cpu --steps 4   # < 1 min
"""

from __future__ import annotations

import argparse
import gc
import math
import time
import traceback
from dataclasses import dataclass

import profiling  # benchmarks/profiling.py, beside this script
import torch
import torch.nn.functional as F

from nativevl.config import preset
from nativevl.io.hf_config import config_to_hf
from nativevl.model.vlm import VisionLanguageModel
from nativevl.train import parallel
from nativevl.train.losses import labelled_lm_loss
from nativevl.train.metrics import batch_flops, module_sizes, pass_factors, peak_flops

FULL = pass_factors({"vit": "full", "mlp": "full", "llm": "full"})

# our configurations; each key is a knob of run_ours
VARIANTS = {
    "base": {"expandable_segments": False, "fsdp": False},
    "fast": {"expandable_segments": True, "fsdp": False},
    "fsdp": {"expandable_segments": True, "fsdp": True},
}


@dataclass
class Sample:
    input_ids: torch.Tensor  # (L,)
    labels: torch.Tensor  # (L,) next-token targets, -100 where unlabelled
    tiles: int


def make_stream(cfg, n: int, seed: int, min_len: int, max_len: int, max_tiles: int) -> list[Sample]:
    g = torch.Generator().manual_seed(seed)
    per_tile = cfg.image_seq_length
    out = []
    for _ in range(n):
        length = int(math.exp(math.log(min_len) + torch.rand((), generator=g).item() * math.log(max_len / min_len)))
        room = max(0, (length - 32) // per_tile)
        tiles = 0 if torch.rand((), generator=g).item() < 1 / 3 else int(torch.randint(0, min(max_tiles, room) + 1, (), generator=g))
        ids = torch.randint(10, cfg.text.vocab_size, (length,), generator=g)
        ids[ids == cfg.image_token_id] = 10  # image slots only where the tiles go
        ids[8 : 8 + tiles * per_tile] = cfg.image_token_id
        text_start = 8 + tiles * per_tile
        labels = torch.full((length,), -100)
        first = text_start + (length - text_start) // 2
        labels[first - 1 : -1] = ids[first:]  # predict the second half of the text
        out.append(Sample(ids, labels, tiles))
    return out


def steps_of(stream: list[Sample], step_tokens: int, steps: int) -> list[list[Sample]]:
    out, i = [], 0
    for _ in range(steps):
        step, n = [], 0
        while i < len(stream) and n + len(stream[i].input_ids) <= step_tokens:
            step.append(stream[i])
            n += len(stream[i].input_ids)
            i += 1
        if not step:
            raise ValueError(f"a sample of {len(stream[i].input_ids)} tokens exceeds --step_tokens {step_tokens}")
        out.append(step)
    return out


_PIXELS: dict[tuple, torch.Tensor] = {}


def pixels(tiles: int, cfg, device, seed: int) -> torch.Tensor | None:
    """The step's tiles; made once (main() makes them all before timing) and reused by every side."""
    if tiles == 0:
        return None
    key = (tiles, seed, str(device), cfg.vision.image_size)
    if key not in _PIXELS:
        g = torch.Generator().manual_seed(seed)
        size = cfg.vision.image_size
        _PIXELS[key] = torch.randn(tiles, 3, size, size, generator=g).to(device)
    return _PIXELS[key]


def step_flops(cfg, sizes, step: list[Sample]) -> float:
    return batch_flops(cfg, sizes, FULL, [len(s.input_ids) for s in step], sum(s.tiles for s in step))


def set_expandable_segments(device, on: bool) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        try:
            torch.cuda.memory._set_allocator_settings(f"expandable_segments:{on}")
        except Exception as e:  # noqa: BLE001 - a private API: measure anyway, and say so
            print(f"  (could not set expandable_segments:{on}: {type(e).__name__}: {e})")


def single_process_group(device) -> None:
    """FSDP2 needs a process group even for one rank."""
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0, world_size=1)


def run_ours(cfg, sd, steps, args, device, variant: str = "base") -> dict:
    knobs = VARIANTS[variant]
    torch._dynamo.reset()  # each variant compiles afresh (inductor's on-disk cache still helps) and gets its own limits
    set_expandable_segments(device, knobs["expandable_segments"])
    cuda = device.type == "cuda"
    with torch.device(device):  # built where it trains (a 2B model's init on the host took ~15 s)
        model = VisionLanguageModel(cfg)
    model.load_state_dict(sd)
    model.attn_backend = args.attn
    if knobs["fsdp"]:
        single_process_group(device)
    # the loop's building block: compile per block (and FSDP2 per block and root when sharded)
    parallel.parallelize(model, world=1, mixed_precision=cuda, activation_checkpointing=False, compile=args.compile,
                         shard=knobs["fsdp"])
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=cuda or None)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda)

    def one_step(i, step):
        ids = torch.cat([s.input_ids for s in step]).to(device)
        labels = torch.cat([s.labels for s in step]).to(device)
        lengths = torch.tensor([0] + [len(s.input_ids) for s in step])
        cu = lengths.cumsum(0).to(device)
        pv = pixels(sum(s.tiles for s in step), cfg, device, i)
        weights = (labels != -100).float()
        with autocast:
            hidden = model(input_ids=ids, pixel_values=pv, cu_seqlens=cu, compute_logits=False).hidden_states
            loss = labelled_lm_loss(hidden, model.lm_head.weight, labels, weights, weights.sum(), args.loss_chunk)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    out = timed_run(one_step, steps, cfg, module_sizes(model), args, device)
    out["variant"] = variant
    if variant in (args.profile or "").split(","):
        trace = profiling.trace_name(args.trace_dir, f"train-{variant}") if args.trace_dir else None
        out["profile"] = profiling.profile_call(lambda: one_step(len(steps) - 1, steps[-1]), device, trace=trace, stack=True)
    return out


def run_theirs(cfg, sd, steps, args, device) -> dict:
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    hf_cfg = InternVLConfig(**config_to_hf(cfg))
    hf_cfg._attn_implementation = "sdpa"
    with torch.device(device):
        model = InternVLForConditionalGeneration(hf_cfg)
    # our module names are transformers' (>= 4.52) under its `model.` prefix
    missing, unexpected = model.load_state_dict({k if k == "lm_head.weight" else f"model.{k}": v for k, v in sd.items()},
                                                strict=False)
    assert not unexpected and not [k for k in missing if "lm_head" not in k], (missing, unexpected)
    sizes = module_sizes(VisionLanguageModel(cfg).to("meta"))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda" or None)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    pad = cfg.text.pad_token_id or 0

    def one_step(i, step):
        total = sum(int((s.labels != -100).sum()) for s in step)
        pv_all = pixels(sum(s.tiles for s in step), cfg, device, i)
        tile0, loss_sum = 0, torch.zeros((), device=device)
        for j in range(0, len(step), args.hf_batch):
            micro = step[j : j + args.hf_batch]
            width = max(len(s.input_ids) for s in micro)
            ids = torch.full((len(micro), width), pad)
            labels = torch.full((len(micro), width), -100)
            mask = torch.zeros((len(micro), width), dtype=torch.long)
            for r, s in enumerate(micro):
                ids[r, : len(s.input_ids)], labels[r, : len(s.input_ids)], mask[r, : len(s.input_ids)] = s.input_ids, s.labels, 1
            n_tiles = sum(s.tiles for s in micro)
            pv = pv_all[tile0 : tile0 + n_tiles] if n_tiles else None
            tile0 += n_tiles
            with autocast:
                logits = model(input_ids=ids.to(device), pixel_values=pv, attention_mask=mask.to(device)).logits
                loss = F.cross_entropy(logits.float().flatten(0, 1), labels.to(device).flatten(), ignore_index=-100,
                                       reduction="sum") / total
            loss.backward()
            loss_sum += loss.detach()
            del logits, loss
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss_sum

    return timed_run(one_step, steps, cfg, sizes, args, device)


def dynamo_compiles() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def timed_run(one_step, steps, cfg, sizes, args, device) -> dict:
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    losses = []
    for i, step in enumerate(steps[: args.warmup]):  # compilation, allocator warm-up
        losses.append(float(one_step(i, step)))
    sync()
    compiles0 = dynamo_compiles()
    retries0 = torch.cuda.memory_stats(device).get("num_alloc_retries", 0) if cuda else 0
    t0 = time.perf_counter()
    timed = steps[args.warmup :]
    for i, step in enumerate(timed, start=args.warmup):
        losses.append(float(one_step(i, step)))
    sync()
    elapsed = time.perf_counter() - t0
    tokens = sum(len(s.input_ids) for step in timed for s in step)
    flops = sum(step_flops(cfg, sizes, step) for step in timed)
    peak = peak_flops(device, args.peak_tflops)
    return {
        "tokens_per_s": tokens / elapsed,
        "step_s": elapsed / len(timed),
        "mfu": flops / elapsed / peak if peak else None,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None,
        "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30 if cuda else None,
        "alloc_retries_timed": (torch.cuda.memory_stats(device).get("num_alloc_retries", 0) - retries0) if cuda else None,
        "compiles_timed": dynamo_compiles() - compiles0,  # graphs compiled inside the timed steps (should be 0)
        "losses": losses,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="tiny", choices=["tiny", "internvl3_1b", "internvl3_2b"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=10, help="timed steps (after --warmup)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--step_tokens", type=int, default=None, help="real tokens per step (default 16384; tiny 2048)")
    ap.add_argument("--hf_batch", type=int, default=2, help="samples per transformers micro-batch")
    ap.add_argument("--attn", default=None, choices=["varlen", "flex", "sdpa"], help="ours (default varlen on CUDA)")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="torch.compile our blocks (default: on CUDA)")
    ap.add_argument("--loss_chunk", type=int, default=4096)
    ap.add_argument("--peak_tflops", type=float, default=None, help="for MFU on an unknown card")
    ap.add_argument("--variants", default="fast",
                    help=f"comma-separated configurations of ours, each timed on a fresh model: {', '.join(VARIANTS)}")
    ap.add_argument("--profile", default=None, help="comma-separated variants to profile for one extra step")
    ap.add_argument("--trace-dir", default=None, help="keep each profiled step's trace here (gzipped Chrome trace)")
    ap.add_argument("--only", choices=["ours", "transformers"], default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()
    device = torch.device(args.device)
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        ap.error(f"--variants: unknown {unknown or 'none given'}; known: {', '.join(VARIANTS)}")
    args.attn = args.attn or ("varlen" if device.type == "cuda" else "sdpa")
    args.compile = device.type == "cuda" if args.compile is None else args.compile
    tiny = args.shape == "tiny"
    step_tokens = args.step_tokens or (2048 if tiny else 16384)
    cfg = preset(args.shape)
    min_len, max_len = (32, 512) if tiny else (128, 4096)
    stream = make_stream(cfg, 4000, args.seed, min_len, max_len, 13)
    steps = steps_of(stream, step_tokens, args.warmup + args.steps)
    torch.manual_seed(args.seed)
    init = VisionLanguageModel(cfg)
    init.init_weights()
    sd = {k: v.detach().clone() for k, v in init.state_dict().items()}
    del init
    for i, step in enumerate(steps):  # before any clock starts
        pixels(sum(x.tiles for x in step), cfg, device, i)
    n_samples = sum(len(s) for s in steps[args.warmup :])
    tiles = sum(x.tiles for s in steps[args.warmup :] for x in s)
    print(f"shape={args.shape} device={args.device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}) "
          f"torch {torch.__version__}; {args.steps} timed steps of <= {step_tokens} tokens: {n_samples} samples, {tiles} tiles; "
          f"ours: {args.attn}, compile={args.compile}, variants {','.join(variants)}; "
          f"transformers: sdpa, padded batches of {args.hf_batch}")
    run_info = {"shape": args.shape, "device": args.device, "step_tokens": step_tokens, "steps": args.steps,
                "attn": args.attn, "compile": args.compile, "torch": torch.__version__, "variants": variants,
                "card": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    results: dict[str, dict] = {}
    sides = {f"ours[{v}]": (lambda *a, v=v: run_ours(*a, variant=v)) for v in variants}
    sides["transformers"] = run_theirs
    for name, fn in sides.items():
        if args.only and not name.startswith(args.only):
            continue
        if name == "transformers":
            set_expandable_segments(device, False)  # the peer as users run it: default allocator
        try:
            results[name] = fn(cfg, sd, steps, args, device)
        except Exception as e:  # noqa: BLE001 - one side failing (OOM, compile) must not lose the others' numbers
            results[name] = {"error": f"{type(e).__name__}: {str(e)[:500]}"}
            traceback.print_exc()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        r = results[name]
        if "error" not in r:
            mfu = f", MFU {r['mfu']:.1%}" if r["mfu"] is not None else ""
            mem = f", peak {r['peak_memory_gib']:.1f} GiB" if r["peak_memory_gib"] is not None else ""
            print(f"  {name}: {r['tokens_per_s']:.0f} tokens/s, {r['step_s']:.3f} s/step{mfu}{mem}", flush=True)
        write_json(args.json, {**run_info, "results": results, "partial": True})  # a run cut short keeps its sides
    print(f"{'':16s} {'tokens/s':>10s} {'step s':>8s} {'MFU':>7s} {'peak GiB':>9s} {'resv GiB':>9s} {'retries':>7s} "
          f"{'recomp':>6s}  first losses")
    for name, r in results.items():
        if "error" in r:
            print(f"{name:16s} failed: {r['error']}")
            continue
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        mem = f"{r['peak_memory_gib']:.1f}" if r["peak_memory_gib"] is not None else "-"
        resv = f"{r['peak_reserved_gib']:.1f}" if r.get("peak_reserved_gib") is not None else "-"
        retries = str(r["alloc_retries_timed"]) if r.get("alloc_retries_timed") is not None else "-"
        print(f"{name:16s} {r['tokens_per_s']:10.0f} {r['step_s']:8.3f} {mfu:>7s} {mem:>9s} {resv:>9s} {retries:>7s} "
              f"{r.get('compiles_timed', '-')!s:>6s}  {', '.join(f'{x:.4f}' for x in r['losses'][:3])}")
    ours_ok = [n for n in results if n.startswith("ours") and "error" not in results[n]]
    theirs = results.get("transformers", {})
    speedups = {}
    for n in ours_ok:
        r = results[n]
        if "error" not in theirs and theirs:
            speedups[n] = r["tokens_per_s"] / theirs["tokens_per_s"]
        if ours_ok[0] != n:
            ref = results[ours_ok[0]]
            diff = max(abs(a - b) for a, b in zip(r["losses"], ref["losses"]))
            print(f"{n}: {r['tokens_per_s'] / ref['tokens_per_s']:.2f}x {ours_ok[0]}'s tokens/s; "
                  f"max |loss difference| over all steps {diff:.2e}")
    for n, x in speedups.items():
        print(f"speed-up (tokens/s, {n} / transformers): {x:.2f}x")
    ratio = speedups.get(ours_ok[-1]) if ours_ok else None  # the last (fastest-intended) variant
    write_json(args.json, {**run_info, "results": {**results, **({"ours": results[ours_ok[-1]]} if ours_ok else {})},
                           "speedup": ratio, "speedups": speedups})


def write_json(path: str | None, payload: dict) -> None:
    if path:
        profiling.write_json(path, payload)


if __name__ == "__main__":
    main()
