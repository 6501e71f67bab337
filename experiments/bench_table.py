"""Tables of experiments/benchmark.py's results: one run's Markdown, and the README's results table.

    python experiments/benchmark.py --readme README.md --results DIR      (or: python experiments/bench_table.py README.md DIR)

Rewrites only the text between the <!-- bench-table --> and <!-- /bench-table --> markers.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

BUSY = "**BUSY**"


def _avx(flag) -> str:
    return {True: "AVX-512", False: "no AVX-512"}.get(flag, "AVX-512 unknown")


def _load(load) -> str:
    return f"{load[0]:.2f}" if load else "unknown"


def conditions(result: dict) -> str:
    """One line: processor, load averages before/after, convolution lowering; loud when the run was busy."""
    if "processor" not in result and "load_average_before" not in result:
        return "run conditions (processor, load before the run) not recorded: an older result"
    cpu = result.get("processor") or {}
    now = result.get("cpu_busy_before")
    line = (f"host {cpu.get('model', 'unknown')} ({_avx(cpu.get('avx512'))}, {cpu.get('cores', '?')} cores); "
            + (f"{now:.0%} of the cores busy just before the run; " if now is not None else "")
            + f"1-min load {_load(result.get('load_average_before'))} before, "
            f"{_load(result.get('load_average_after'))} after; "
            f"SEGJAX_CONV={result.get('conv_method', 'auto')}")
    if result.get("conv_plan"):
        line += " (" + ", ".join(f"{kind} {how}" for kind, how in result["conv_plan"].items()) + ")"
    if result.get("busy"):
        line = (f"{BUSY}: started on a busy machine; PyTorch's OpenMP threads slow 6-12x under load, so these "
                f"ratios are not trustworthy. {line}")
    if result.get("partial"):
        line += " (partial: the run stopped before it finished)"
    return line


def markdown(result: dict) -> str:
    head = (f"**{result['model']}** {result['size'][0]}x{result['size'][1]}, batch {result['batch']}, "
            f"{result['dtype']}, {result['device']}, {result['params']:,} params, "
            f"{result['forward_gflop_per_image']:.2f} GFLOP/img forward (XLA)\n\n{conditions(result)}\n\n")
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


def readme_table(results: list[dict], source: str = "docs/bench_results") -> str:
    """The README's results table: one row per benchmark result (sorted by card, then model); rows of
    runs that started on a busy machine say BUSY in their card column."""
    lines = ["| model | params | GFLOP/img (fwd) | input | dtype | train img/s | infer img/s "
             "| vs torch eager (train / infer) | vs torch.compile (train / infer) | card |",
             "|---|---|---|---|---|---|---|---|---|---|"]

    def ratio(r, impl):
        side = r.get("torch", {}).get(impl)
        if not side:
            return "-"
        return " / ".join(f"{r['jax'][m]['images_per_s'] / side[m]['images_per_s']:.2f}x" if m in side else "-"
                          for m in ("train", "infer"))

    for r in sorted(results, key=lambda r: (r.get("card", r["device"]), r["model"], r["size"], r["batch"])):
        kw = ", ".join(f"{k}={v}" for k, v in r.get("model_kw", {}).items())
        name = f"{r['model']} ({kw})" if kw else r["model"]
        card = r.get("card", r["device"]) + (f" {BUSY}" if r.get("busy") else "")
        card += " (partial)" if r.get("partial") else ""
        lines.append(f"| {name} | {r['params'] / 1e6:.1f}M | {r['forward_gflop_per_image']:.2f} | "
                     f"{r['size'][0]}x{r['size'][1]} x{r['batch']} | {r['dtype']} | "
                     f"{r['jax']['train']['images_per_s']:.2f} | {r['jax']['infer']['images_per_s']:.2f} | "
                     f"{ratio(r, 'eager')} | {ratio(r, 'compile')} | {card} |")
    notes = ["", "JAX and PyTorch run in one process on the same device, so both see the same load. "
             f"Results: {source}/*.json; regenerate this table with "
             f"`python experiments/benchmark.py --readme README.md --results {source}`."]
    for key, when in (("load_average_before", "as each run started"), ("load_average", "as each run finished")):
        loads = [r[key][0] for r in results if r.get(key)]
        if loads:
            notes.append(f"1-minute load average {when}: {min(loads):.1f} to {max(loads):.1f}.")
    busy_now = [r["cpu_busy_before"] for r in results if r.get("cpu_busy_before") is not None]
    if busy_now:
        notes.append(f"Cores busy in the 1-second sample just before each run: {min(busy_now):.0%} to {max(busy_now):.0%} "
                     "(the load average lags: it still counts the previous run).")
    cpus = sorted({(r["processor"]["model"], r["processor"].get("avx512")) for r in results if r.get("processor")},
                  key=str)
    if cpus:
        notes.append("Host CPU: " + "; ".join(f"{m} ({_avx(a)})" for m, a in cpus) + ".")
    convs = sorted({r["conv_method"] for r in results if r.get("conv_method")})
    if convs:
        notes.append(f"SEGJAX_CONV: {', '.join(convs)}.")
    busy = [r["model"] for r in results if r.get("busy")]
    if busy:
        notes.append(f"{BUSY}: {', '.join(busy)} started on a busy machine (--allow-busy); PyTorch's OpenMP "
                     "threads slow 6-12x under load, so those ratios fake a JAX win. Rerun them idle.")
    partial = [r["model"] for r in results if r.get("partial")]
    if partial:
        notes.append(f"Partial (stopped before finishing, e.g. by a timeout): {', '.join(partial)}.")
    if not any(r.get("platform") == "gpu" for r in results):
        notes.append("GPU figures are unmeasured so far: every row ran on the device its card column names.")
    return "\n".join(lines + notes)


def side_by_side(results: list[dict]) -> str:
    """Images/s of segjax, PyTorch eager and torch.compile per model and mode, and segjax over the faster
    PyTorch column (the GPU suite's goal is >= 1.5x there)."""
    lines = ["| model | input | mode | segjax | torch eager | torch.compile | segjax / faster torch |",
             "|---|---|---|---|---|---|---|"]
    for r in sorted(results, key=lambda r: r["model"]):
        for mode in ("train", "infer"):
            ours = r["jax"][mode]["images_per_s"]
            theirs = [r.get("torch", {}).get(v, {}).get(mode, {}).get("images_per_s") for v in ("eager", "compile")]
            found = [t for t in theirs if t]
            cells = [f"{t:.1f}" if t else "-" for t in theirs]
            flag = f" {BUSY}" if r.get("busy") else ""
            lines.append(f"| {r['model']}{flag} | {r['size'][0]}x{r['size'][1]} x{r['batch']} {r['dtype']} | {mode} | "
                         f"{ours:.1f} | {' | '.join(cells)} | {f'{ours / max(found):.2f}x' if found else '-'} |")
    return "\n".join(lines)


def update_readme(readme: Path, results: list[dict], source: str = "docs/bench_results") -> str:
    """Replaces the text between README_BEGIN and README_END with readme_table(results)."""
    from segjax.errors import SegjaxError

    text = readme.read_text()
    begin, end = text.find(README_BEGIN), text.find(README_END)
    if begin < 0 or end < begin:
        raise SegjaxError(f"{readme} has no {README_BEGIN} ... {README_END} block; add the two markers where "
                          "the table should go")
    table = readme_table(results, source)
    readme.write_text(text[: begin + len(README_BEGIN)] + "\n" + table + "\n" + text[end:])
    return table


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("readme", type=Path, help="the Markdown file holding the table's markers")
    parser.add_argument("results", type=Path, help="a folder of benchmark.py's *.json results")
    args = parser.parse_args()
    found = [json.loads(f.read_text()) for f in sorted(args.results.glob("*.json"))]
    if not found:
        raise SystemExit(f"no benchmark results (*.json) in {args.results}")
    print(update_readme(args.readme, found))
