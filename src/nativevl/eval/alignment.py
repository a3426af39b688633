"""Collect the alignment experiment's reports into docs/results/alignment.{json,md}.

`python -m nativevl.eval.alignment RUN_DIR OUT_DIR` reads RUN_DIR/eval_sft.json and eval_mpo.json
(`nativevl eval`) and RUN_DIR/best_of_n.json (`nativevl eval --best-of-n 8 --prm ...`; best_of_n_mpo.json, the same with the MPO model, if present), all on the
same task, base model and held-out seed, and writes the figures with their 95% intervals and, where
the reports keep per-question records, paired tests (exact McNemar) of the claims on the same questions.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from nativevl.eval.runner import compare


def summarize(sft: dict, mpo: dict, bon: dict, bon_mpo: dict | None = None, task: str = "arithmetic") -> dict:
    counts = {sft[task]["n"], mpo[task]["n"], bon[task]["pass1"]["n"]}
    if bon_mpo is not None:
        counts.add(bon_mpo[task]["pass1"]["n"])
        for key in ("samples", "seed", "temperature"):
            if bon_mpo[task][key] != bon[task][key]:
                raise ValueError(f"the Best-of-N reports differ in {key}: {bon[task][key]} and {bon_mpo[task][key]}")
    if len(counts) != 1:
        raise ValueError("the reports were made on different numbers of questions")
    k = bon[task]["samples"]
    pick = lambda r: {"accuracy": r["accuracy"], "ci95": r["ci95"], "n": r["n"]}
    out = {
        "task": task,
        "sft": pick(sft[task]),
        "mpo": pick(mpo[task]),
        "pass1": pick(bon[task]["pass1"]),
        f"majority{k}": pick(bon[task][f"majority{k}"]),
        f"prm_best{k}": pick(bon[task][f"prm_best{k}"]),
        f"outcome_best{k}": pick(bon[task][f"outcome_best{k}"]),
        f"oracle{k}": pick(bon[task][f"oracle{k}"]),
        "sample_mean": bon[task]["sample_mean"],
        "n": sft[task]["n"],
        "chance": sft[task]["chance"],
        "seed": bon[task]["seed"],
        "temperature": bon[task]["temperature"],
    }
    if bon_mpo is not None:  # the same test-time scaling with the MPO model as the policy
        out.update({f"mpo_{key}": pick(bon_mpo[task][key]) for key in (f"majority{k}", f"prm_best{k}")})
        out["mpo_sample_mean"] = bon_mpo[task]["sample_mean"]
    if all("records" in r[task] for r in (sft, mpo, bon)):
        # (first, second): the second's gain over the first, on the same questions
        pairs = {"mpo vs sft (greedy)": (sft, None, mpo, None),
                 f"prm_best{k} vs pass1": (bon, "pass1", bon, f"prm_best{k}"),
                 f"prm_best{k} vs majority{k}": (bon, f"majority{k}", bon, f"prm_best{k}"),
                 f"outcome_best{k} vs pass1": (bon, "pass1", bon, f"outcome_best{k}")}
        if bon_mpo is not None and "records" in bon_mpo[task]:
            pairs[f"mpo majority{k} vs sft majority{k}"] = (bon, f"majority{k}", bon_mpo, f"majority{k}")
            pairs[f"mpo prm_best{k} vs sft prm_best{k}"] = (bon, f"prm_best{k}", bon_mpo, f"prm_best{k}")
        out["paired"] = {name: compare(a, b, task, ma, mb) for name, (a, ma, b, mb) in pairs.items()}
    return out


def table(summary: dict) -> str:
    rows = ["| method | accuracy | 95% interval | n |", "|---|---|---|---|"]
    for key, v in summary.items():
        if isinstance(v, dict) and "ci95" in v:
            rows.append(f"| {key} | {v['accuracy']:.3f} | {v['ci95'][0]:.3f}-{v['ci95'][1]:.3f} | {v['n']} |")
    if summary.get("paired"):
        header = "| paired on the same questions | difference | only the first right | only the second right | p (exact McNemar) |"
        rows += ["", header, "|---|---|---|---|---|"]
        rows += [f"| {name} | {t['difference']:+.3f} | {t['b_only']} | {t['a_only']} | {t['p_value']:.3g} |"
                 for name, t in summary["paired"].items()]
    return "\n".join(rows) + "\n"


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m nativevl.eval.alignment RUN_DIR OUT_DIR", file=sys.stderr)
        return 2
    run, out = Path(argv[0]), Path(argv[1])
    load = lambda name: json.loads((run / name).read_text())
    bon_mpo = load("best_of_n_mpo.json") if (run / "best_of_n_mpo.json").is_file() else None
    summary = summarize(load("eval_sft.json"), load("eval_mpo.json"), load("best_of_n.json"), bon_mpo)
    out.mkdir(parents=True, exist_ok=True)
    (out / "alignment.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(table(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
