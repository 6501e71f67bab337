"""Tables of experiments/benchmark.py's results: one run's Markdown, and the README's results table.

    python experiments/benchmark.py --readme README.md --results DIR      (or: python experiments/bench_table.py README.md DIR)

Rewrites only the text between the <!-- bench-table --> and <!-- /bench-table --> markers.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

def markdown(result: dict) -> str:
    head = (f"**{result['model']}** {result['size'][0]}x{result['size'][1]}, batch {result['batch']}, "
            f"{result['dtype']}, {result['device']}, {result['params']:,} params, "
            f"{result['forward_gflop_per_image']:.2f} GFLOP/img forward (XLA)\n\n")
    rows = ["| impl | mode | images/s | ms/step | compile s | TFLOP/s (XLA) | TFLOP/s (model) | MFU (XLA) | MFU (model) |",
            "|---|---|---|---|---|---|---|---|---|"]

    def row(impl, mode, r):
        def num(key, fmt):
            return fmt(r[key]) if r.get(key) is not None else "-"
        comp = r.get("compile_s", r.get("first_call_s"))
        tflops = [num(f"tflops_{k}", lambda v: f"{v:.3g}") for k in ("xla", "model")]
        mfu = [num(f"mfu_{k}", lambda v: f"{100 * v:.1f}%") for k in ("xla", "model")]
        rows.append(f"| {impl} | {mode} | {r['images_per_s']:.2f} | {1e3 * r['step_s']:.1f} | {comp:.1f} | "
                    + " | ".join(tflops + mfu) + " |")

    for mode in ("train", "infer", "eval"):
        r = result["jax"].get(mode)
        if r and "skipped" not in r:
            row("jax", mode, r)
    for label in ("eager", "compile"):
        for mode, r in result.get("torch", {}).get(label, {}).items():
            row(f"torch {label}", mode, r)
    notes = [f"- JAX / torch {k.replace('_', ' ')}: {v:.2f}x" for k, v in result.get("ratio", {}).items()]
    notes += [f"- {part}: skipped ({result[part]['skipped']})" for part in ("torch", "loader")
              if isinstance(result.get(part), dict) and "skipped" in result[part]]
    loader = result.get("loader", {})
    notes += [f"- data loader ({k.replace('_', ' ')}): {v}" for k, v in loader.items() if k.endswith("images_per_s")]
    if "confusion_share" in result["jax"].get("eval", {}):
        notes.append(f"- confusion matrix: {100 * result['jax']['eval']['confusion_share']:.1f}% of the eval step "
                     "(eval step vs the same forward + argmax without it, interleaved medians)")
    if "eval" in result["jax"] and "skipped" in result["jax"]["eval"]:
        notes.append(f"- eval: skipped ({result['jax']['eval']['skipped']})")
    return head + "\n".join(rows) + ("\n\n" + "\n".join(notes) if notes else "") + "\n"


README_BEGIN, README_END = "<!-- bench-table -->", "<!-- /bench-table -->"


def readme_table(results: list[dict]) -> str:
    """The README's results table: one row per benchmark result (sorted by card, then model)."""
    lines = ["| model | params | GFLOP/img (fwd) | input | dtype | train img/s | infer img/s "
             "| vs torch eager (train / infer) | vs torch.compile (train / infer) | card |",
             "|---|---|---|---|---|---|---|---|---|---|"]

    def ratio(r, impl):
        side = r.get("torch", {}).get(impl)
        if not side:
            return "-"
        return " / ".join(f"{r['jax'][m]['images_per_s'] / side[m]['images_per_s']:.2f}x" for m in ("train", "infer"))

    for r in sorted(results, key=lambda r: (r.get("card", r["device"]), r["model"], r["size"], r["batch"])):
        kw = ", ".join(f"{k}={v}" for k, v in r.get("model_kw", {}).items())
        name = f"{r['model']} ({kw})" if kw else r["model"]
        lines.append(f"| {name} | {r['params'] / 1e6:.1f}M | {r['forward_gflop_per_image']:.2f} | "
                     f"{r['size'][0]}x{r['size'][1]} x{r['batch']} | {r['dtype']} | "
                     f"{r['jax']['train']['images_per_s']:.2f} | {r['jax']['infer']['images_per_s']:.2f} | "
                     f"{ratio(r, 'eager')} | {ratio(r, 'compile')} | {r.get('card', r['device'])} |")
    loads = [r["load_average"][0] for r in results if r.get("load_average")]
    notes = ["", "JAX and PyTorch run in one process on the same device, so both see the same load. "
             "Results: docs/bench_results/*.json; regenerate this table with "
             "`python experiments/benchmark.py --readme README.md --results docs/bench_results`."]
    if loads:
        notes.append(f"1-minute load average as each run finished: {min(loads):.1f} to {max(loads):.1f}.")
    if not any(r.get("platform") == "gpu" for r in results):
        notes.append("GPU figures are unmeasured so far: no GPU was available in the session that produced this table.")
    return "\n".join(lines + notes)


def update_readme(readme: Path, results: list[dict]) -> str:
    """Replaces the text between README_BEGIN and README_END with readme_table(results)."""
    from segjax.errors import SegjaxError

    text = readme.read_text()
    begin, end = text.find(README_BEGIN), text.find(README_END)
    if begin < 0 or end < begin:
        raise SegjaxError(f"{readme} has no {README_BEGIN} ... {README_END} block; add the two markers where "
                          "the table should go")
    table = readme_table(results)
    readme.write_text(text[: begin + len(README_BEGIN)] + "\n" + table + "\n" + text[end:])
    return table


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    found = [json.loads(f.read_text()) for f in sorted(Path(sys.argv[2]).glob("*.json"))]
    if not found:
        raise SystemExit(f"no benchmark results (*.json) in {sys.argv[2]}")
    print(update_readme(Path(sys.argv[1]), found))
