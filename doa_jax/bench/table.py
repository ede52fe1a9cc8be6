"""Markdown tables of benchmark rows (`doa bench`), with the PyTorch peer's figures and ratios beside ours."""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

def _fmt(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if spec == "k":
        return f"{value / 1e3:.1f}k"
    if spec == "%":
        return f"{100 * value:.1f}%"
    return format(value, spec)


def _peer_index(peer_rows: Sequence[Mapping[str, Any]]) -> dict[tuple[str, str], Mapping[str, Any]]:
    return {(r.get("kind"), r.get("size")): r for r in peer_rows if "error" not in r}


def table(rows: Sequence[Mapping[str, Any]], peer_rows: Sequence[Mapping[str, Any]] = ()) -> str:
    """Markdown tables: train, decode, start-up, distillation; peer figures and ratios beside ours."""
    peer = _peer_index(peer_rows)
    out = []
    train = [r for r in rows if r.get("part") == "train" and "error" not in r and r.get("step_s")]
    if train:
        # MFU is over the datasheet peak (`progress.mfu`); the peer's figure is over its measured matmul
        # peak, so it sits beside ours over the same measured peak.
        out += ["| train | opt | batch | scan/remat/params | step s | tokens/s | MFU (peer formula) | MFU (+attn) "
                "| of measured matmul peak (peer formula) | peak GiB | peer tokens/s (eager / compile) "
                "| peer, of measured matmul peak | ratio vs peer (eager / compile) |",
                "|" + "---|" * 13]
        for r in train:
            p, pc = peer.get(("train", r["size"])), peer.get(("trainc", r["size"]))
            same_batch = lambda q: q is not None and q.get("batch") == r["batch"]  # noqa: E731
            ratio = " / ".join(_fmt(r["tokens_per_s"] / q["tokens_per_s"], ".2f") + "x" if same_batch(q) else "-"
                               for q in (p, pc))
            out.append(f"| {r['size']} | {r['optimizer']} | {r['batch']} | "
                       f"{'scan' if r['scan'] else 'unrolled'}/{r['remat']}/{r['param_dtype']} | "
                       f"{_fmt(r['step_s'], '.4f')} | {_fmt(r['tokens_per_s'], 'k')} | {_fmt(r.get('mfu'), '%')} | "
                       f"{_fmt(r.get('mfu_attn'), '%')} | {_fmt(r.get('matmul_peak_fraction'), '%')} | "
                       f"{_fmt(r.get('peak_gib'), '.1f')} | "
                       f"{_fmt(p and p['tokens_per_s'], 'k')} / {_fmt(pc and pc['tokens_per_s'], 'k')} | "
                       f"{_fmt(p and p.get('mfu'), '%')} | {ratio} |")
        out.append("")
    decode = [r for r in rows if r.get("part") == "decode" and "error" not in r and r.get("batch_s")]
    if decode:
        out += ["| decode | batch | in/new | scan/cross K/V | batch s | examples/s | floor examples/s | peak GiB "
                "| peer examples/s | ratio |", "|" + "---|" * 10]
        for r in decode:
            p = peer.get(("generate", r["size"]))
            out.append(f"| {r['size']} | {r['batch']} | {r['in_len']}/{r['new_tokens']} | "
                       f"{'scan' if r['scan'] else 'unrolled'}/{r.get('cross_kv', 'cache')} | "
                       f"{_fmt(r['batch_s'], '.3f')} | {_fmt(r['examples_per_s'], '.1f')} | "
                       f"{_fmt(r.get('floor_examples_per_s'), '.0f')} | "
                       f"{_fmt(r.get('peak_gib'), '.1f')} | {_fmt(p and p['examples_per_s'], '.1f')} | "
                       f"{_fmt(p and r['examples_per_s'] / p['examples_per_s'], '.2f')}"
                       f"{'x' if p else ''} |")
        out.append("")
    start = [r for r in rows if r.get("part") in ("train", "decode") and "error" not in r and "startup_s" in r]
    if start:
        out += ["| start-up | size | scan | init s | compile s | first step s | total s |", "|" + "---|" * 7]
        for r in start:
            first = r.get("first_step_s")
            compile_s = r.get("compile_s", r.get("compile_and_first_s"))
            out.append(f"| {r['part']}{' ' + r['optimizer'] if 'optimizer' in r else ''} | {r['size']} | "
                       f"{r['scan']} | {_fmt(r['init_s'], '.1f')} | {_fmt(compile_s, '.1f')}"
                       f"{'' if first is not None else ' (incl. first)'} | {_fmt(first, '.1f')} | "
                       f"{_fmt(r['startup_s'], '.1f')} |")
        out.append("")
    distill = [r for r in rows if r.get("part") == "distill" and "error" not in r]
    if distill:
        out += ["| distill | teacher/student | batch | FLOPs ratio online/stored | student step s | teacher fwd s "
                "| time ratio online/stored |", "|" + "---|" * 7]
        for r in distill:
            out.append(f"| per epoch | {r['teacher']}/{r['student']} | {r['batch']} | "
                       f"{_fmt(r['flops_ratio_online_vs_stored'], '.1f')} | {_fmt(r.get('student_step_s'), '.4f')} | "
                       f"{_fmt(r.get('teacher_forward_s'), '.4f')} | {_fmt(r.get('time_ratio_online_vs_stored'), '.1f')} |")
        out.append("")
    errors = [r for r in rows if "error" in r]
    for r in errors:
        out.append(f"error in {r.get('part')} {r.get('size', '')} {r.get('optimizer', '')}: {r['error']}")
    return "\n".join(out)


def aot_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """`doa aot`'s rows: per program, memory per device, the verdict, compile time, FLOPs and the bound."""
    out = ["| program | phase | batch | in/out | mesh | scan/remat/params | args GiB | temp GiB | peak GiB "
           "| co-resident GiB | capacity GiB | fits (margin GiB) | compile s | TFLOPs | bound s |",
           "|" + "---|" * 15]
    for r in rows:
        if r.get("error"):
            out.append(f"| {r['program']} | {r['phase']} | {r['batch']} | {r['lengths'][0]}/{r['lengths'][1]} | "
                       f"ERROR: {r['error'][:160]} |" + " |" * 10)
            continue
        fits = ("REFUSED" if r.get("refusal") else "yes" if r["fits"] else "NO") + \
            (f" ({r['margin_gib']:+.2f})" if r.get("margin_gib") is not None else "")
        layout = f"{'scan' if r['scan'] else 'unrolled'}/{r['remat']}/{r.get('param_dtype', r['dtype'] + ' (inference)')}"
        if r.get("optimizer"):
            layout += f"/{r['optimizer']}" + (f"/x{r['microbatches']}" if r.get("microbatches", 1) > 1 else "")
            layout += ("/clip" if r.get("grad_clip_norm") is not None else "") + ("/fused" if r.get("fused_update") else "")
        peak = _fmt(r.get("peak_gib"), ".2f") + (" (temps, refused)" if r.get("peak_counts") == "temporaries" else "")
        out.append(f"| {r['program']} | {r['phase']} | {r['batch']} | {r['lengths'][0]}/{r['lengths'][1]} | "
                   f"{r['mesh'][0]}x{r['mesh'][1]}{' fsdp' if r['fsdp'] else ''} | {layout} | "
                   f"{_fmt(r.get('argument_gib'), '.2f')} | {_fmt(r.get('temp_gib'), '.2f')} | {peak} | "
                   f"{_fmt(r.get('co_resident_gib'), '.2f')} | {_fmt(r['capacity_gib'], '.2f')} | {fits} | "
                   f"{_fmt(r.get('compile_s'), '.1f')} | {_fmt(r['flops'] / 1e12, '.1f')} | {_fmt(r.get('bound_s'), '.3g')} |")
    refusals = [f"{r['program']}: {r['refusal']}" for r in rows if r.get("refusal")]
    return "\n".join(out + ([""] + refusals if refusals else []))


def search_table(found: Mapping[str, Any]) -> str:
    """`doa aot --search`: what was compiled, fitting first then cheapest, and the suggestions."""
    tried = found["tried"]
    if not tried:
        return "search: every program fits as it is" if not found["suggestions"] else ""
    out = ["", "| program | target | changes | peak GiB | capacity GiB | fits | chip-s/example (bound) |",
           "|" + "---|" * 7]
    for t in tried:
        change = ", ".join(f"{k}={v}" for k, v in t["changes"].items()) or "-"
        out.append(f"| {t['program']} | {t['target']} | {change} | {_fmt(t.get('peak_gib'), '.2f')} | "
                   f"{_fmt(t['capacity_gib'], '.2f')} | {'yes' if t['fits'] else 'no'} | "
                   f"{_fmt(t.get('chip_s_per_example'), '.3g')} |")
    best = found["suggestions"][:1]
    out.append("")
    out.append(f"suggested: {best[0]['program']} on {best[0]['target']} with "
               + (", ".join(f"{k}={v}" for k, v in best[0]['changes'].items()) or "no change")
               if best else "no fitting setting found within the compile budget (--max-compiles)")
    return "\n".join(out)
