"""The Markdown report, made from the suite's long-format CSV (never from in-memory results)."""
from __future__ import annotations

from pathlib import Path

from ..common import environment_line, markdown_table, read_csv
from .specs import PAPER_TABLE, PROJECTION_DIM, REFERENCE_FLOP_COUNTER

__all__ = ["markdown_report", "write_report", "FAMILY_ORDER"]

FAMILY_ORDER = ["dcformer", "vit3d", "convnext3d", "poolformer3d"]


def _num(value: str) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _find(rows: list[dict], **match) -> dict | None:
    for r in rows:
        if all(r[k] == v for k, v in match.items()):
            return r
    return None


def _value(rows: list[dict], **match) -> float | None:
    r = _find(rows, **match)
    return _num(r["value"]) if r else None


def _spread(r: dict | None, digits: int) -> str:
    if r is None or _num(r["value"]) is None:
        return r["value"] if r else ""
    text = f"{float(r['value']):.{digits}f}"
    if _num(r["p20"]) is not None and _num(r["p80"]) is not None:
        text += f" ({float(r['p20']):.{digits}f}–{float(r['p80']):.{digits}f})"
    return text + _unreliable(r)


def _unreliable(r: dict | None) -> str:
    """The mark of a flagged figure (CSVs written before the flag column have none)."""
    return " (unreliable)" if r is not None and r.get("flag") else ""


def _cell(rows: list[dict], variant: str, metric: str, model: str, path: str, digits: int) -> str:
    found = _find(rows, variant=variant, metric=metric, model=model, backend=path)
    if found is not None:
        return _spread(found, digits)
    failed = _find(rows, variant=variant, metric="error", model=model, backend=path)
    return "error (see *Not measured*)" if failed else ""


def _g(value: float | None, digits: int = 2) -> str:
    return "" if value is None else f"{value / 1e9:.{digits}f}"


def _family_key(label: str, params: float | None):
    family = label.split("_")[0]
    return (FAMILY_ORDER.index(family) if family in FAMILY_ORDER else len(FAMILY_ORDER), params or 0, label)


def _encoder_tables(rows: list[dict]) -> list[str]:
    timed = [r for r in rows if r["variant"] in ("inference", "training") and r["metric"] != "speedup"]
    out = []
    for inp in dict.fromkeys(r["input"] for r in timed):
        one_volume = "x".join(["1"] + inp.split("x")[1:])  # counts are per volume
        counts = [r for r in rows if r["variant"] == "eval" and r["input"] == one_volume]
        for dtype in dict.fromkeys(r["dtype"] for r in timed if r["input"] == inp):
            here = [r for r in timed if r["input"] == inp and r["dtype"] == dtype]
            memory = next((r["unit"] for r in here if r["metric"] == "peak_memory"), "MiB")
            header = ["model", "path", "params (M)", "GFLOP/volume (FlopCounterMode)",
                      "GMAC/volume (fvcore)",
                      "forward ms, median (p20–p80)", "training volumes/s, median (p20–p80)",
                      f"training peak {memory}"]
            keys = sorted(dict.fromkeys((r["model"], r["backend"]) for r in here),
                          key=lambda k: _family_key(k[0], _value(counts, model=k[0], metric="params")))
            lines = []
            for model, path in keys:
                params = _value(counts, model=model, metric="params")
                lines.append([
                    model, path, "" if params is None else f"{params / 1e6:.2f}",
                    _g(_value(counts, model=model, metric="flops_flopcountermode")),
                    _g(_value(counts, model=model, metric="macs_fvcore")),
                    _cell(here, "inference", "latency", model, path, 2),
                    _cell(here, "training", "throughput", model, path, 2),
                    _cell(here, "training", "peak_memory", model, path, 0),
                ])
            out.append(markdown_table(f"Encoders at input {inp} (B x C x D x H x W), {dtype}", header, lines,
                                      here[0]))
    return out


def _speedup_table(rows: list[dict]) -> list[str]:
    speed = [r for r in rows if r["metric"] in ("speedup", "memory_ratio")]
    if not speed:
        return ["### DCFormer: fused kernels against the unfused PyTorch path\n\n"
                "No pair in this run: on a CPU `backend=\"auto\"` resolves to the unfused PyTorch path "
                "(the fused kernels need CUDA). Run `python -m bench.run_all --gpu` on a CUDA machine.\n"]
    header = ["model", "input", "dtype", "forward speed-up", "training-step speed-up",
              "training peak memory, fused / unfused"]
    lines = []
    for model, inp, dtype in dict.fromkeys((r["model"], r["input"], r["dtype"]) for r in speed):
        sel = dict(model=model, input=inp, dtype=dtype)
        found = [_find(speed, variant="inference", metric="speedup", **sel),
                 _find(speed, variant="training", metric="speedup", **sel),
                 _find(speed, variant="training", metric="memory_ratio", **sel)]
        lines.append([model, inp, dtype] + ["" if r is None or _num(r["value"]) is None
                                            else f"{float(r['value']):.2f}x{_unreliable(r)}" for r in found])
    return [markdown_table("DCFormer: fused kernels (backend=\"auto\" on CUDA) against the unfused path "
                           "(backend=\"torch\")", header, lines, speed[0])]


def _paper_table(rows: list[dict]) -> list[str]:
    paper = [r for r in rows if r["variant"] in ("paper count", "eval")]
    header = ["model", "params (ours)", "params (paper)", "GFLOPs fvcore (ours)", "GFLOPs (paper)",
              "GFLOP FlopCounterMode (ours)", "FlopCounterMode (REFERENCE)", "note"]
    lines = []
    for entry in PAPER_TABLE:
        label = entry.encoder.label
        pick = dict(model=label, input="1x1x256x512x512")
        suffix = "+head" if entry.projection_head else ""
        params = _value(paper, variant="paper count", metric="params" + suffix, **pick)
        macs = _value(paper, variant="paper count", metric="macs_fvcore" + suffix, **pick)
        flops = _value(paper, variant="eval", metric="flops_flopcountermode", **pick)
        if params is None and flops is None:
            continue
        ref = REFERENCE_FLOP_COUNTER.get((entry.encoder.name, (1, 1, 256, 512, 512)))
        note = entry.note or (f"with a {PROJECTION_DIM}-d projection head" if entry.projection_head else "encoder only")
        lines.append([label, "" if params is None else f"{params / 1e6:.4f}M", f"{entry.params_m}M",
                      _g(macs, 3), f"{entry.gflops}", _g(flops, 3),
                      "" if ref is None else (f"{ref:,}" + (" (equal)" if flops == ref else " (differs)")), note])
    for (name, shape), ref in REFERENCE_FLOP_COUNTER.items():
        if shape == (1, 1, 256, 512, 512):
            continue
        flops = _value(paper, variant="eval", metric="flops_flopcountermode", model=name,
                       input="x".join(map(str, shape)))
        if flops is not None:
            lines.append([f"{name} at {'x'.join(map(str, shape))}", "", "", "", "", _g(flops, 3),
                          f"{ref:,}" + (" (equal)" if flops == ref else " (differs)"), "Med3DVLM's input"])
    if not lines:
        return []
    first = _find(rows, variant="paper count") or _find(rows, variant="eval") or {}
    intro = (f"Input 1x1x256x512x512 (the paper's 512x512x256, H x W x D). fvcore's count is one per multiply-add "
             f"(the paper's 'GFLOPs'), of the training-mode graph with DCFormer on its unfused path (the official "
             f"graph: BatchNorm on every branch, counted by fvcore at 5 per element); "
             f"nano and tiny add a Linear(c4, {PROJECTION_DIM}) head on the pooled last map, as the paper's "
             f"figures do. FlopCounterMode counts 2 per multiply-add of the eval-mode forward (fused op, BN folded, "
             "not counted). The CSV's unit column says how each fvcore count was made: traced at this input, or "
             "at a quarter of every side times 64 where FlopCounterMode shows that to be exact.")
    return [markdown_table("The DCFormer paper's table", header, lines, first) + "\n" + intro + "\n"]


def markdown_report(rows: list[dict], title: str = "Model benchmark") -> str:
    env = rows[0] if rows else {}
    parts = [f"## {title}\n\n{environment_line(env)}\n\n"
             "Made from the CSV next to this file by `bench/models/report.py`. Paths: *fused* = DCFormer with "
             "`backend=\"auto\"` on CUDA (Triton kernels); *unfused* = DCFormer's PyTorch path (`backend=\"torch\"`, "
             "and what `auto` runs on a CPU); *pytorch* = baselines. Training = forward + backward + AdamW step, "
             "loss = mean of the last stage's map; bfloat16 = autocast with fp32 weights.\n"]
    parts += _encoder_tables(rows)
    parts += _speedup_table(rows)
    parts += _paper_table(rows)
    unreliable = [r for r in rows if r.get("flag")]
    if unreliable:
        parts.append(markdown_table(
            "Unreliable (marked above; not results)", ["model", "input", "dtype", "path", "what", "metric", "why"],
            [[r["model"], r["input"], r["dtype"], r["backend"], r["variant"], r["metric"],
              r["flag"].removeprefix("unreliable: ")] for r in unreliable]))
    problems = [r for r in rows if r["metric"] in ("error", "skipped")]
    if problems:
        parts.append(markdown_table("Not measured", ["model", "input", "dtype", "path", "what", "why"],
                                    [[r["model"], r["input"], r["dtype"], r["backend"], r["variant"], r["value"]]
                                     for r in problems]))
    return "\n".join(parts)


def write_report(csv_path: Path, title: str = "Model benchmark") -> Path:
    md_path = csv_path.with_suffix(".md")
    md_path.write_text(markdown_report(read_csv(csv_path), title))
    return md_path
