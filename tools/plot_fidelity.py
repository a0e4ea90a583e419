#!/usr/bin/env python3
"""Plots `scout eval --csv` output: perplexity change from dense against the share of blocks read,
one line per method. Standard library only: writes SVG, and PNG too when rsvg-convert (Debian
package librsvg2-bin) is on the PATH.

  python3 tools/plot_fidelity.py docs/fidelity.csv docs/fidelity   # -> docs/fidelity.svg [.png]
"""
import csv
import math
import shutil
import subprocess
import sys

COLORS = {"sts": "#d62728", "oracle": "#2ca02c", "quest": "#1f77b4", "window": "#7f7f7f"}


def main():
    src, out = sys.argv[1], sys.argv[2]
    rows = list(csv.DictReader(open(src)))
    series = {}
    for r in rows:
        if r["method"] == "dense":
            continue
        series.setdefault(r["method"], []).append((float(r["blocks_read"]) * 100, float(r["ppl_change_pct"])))
    W, H, L, R, T, B = 720, 440, 70, 150, 40, 60
    xs = [x for pts in series.values() for x, _ in pts]
    ys = [y for pts in series.values() for _, y in pts] + [0.0]
    xmin, xmax = math.log10(min(xs) * 0.8), math.log10(max(xs) * 1.2)
    ymin, ymax = min(ys) - 2, max(ys) + 2
    px = lambda x: L + (math.log10(x) - xmin) / (xmax - xmin) * (W - L - R)
    py = lambda y: T + (ymax - y) / (ymax - ymin) * (H - T - B)
    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
           f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<text x="{W / 2}" y="22" text-anchor="middle" font-size="14">Perplexity change from dense vs share of KV blocks read</text>']
    for x in (1, 2, 5, 10, 20, 50, 100):
        if xmin <= math.log10(x) <= xmax:
            svg.append(f'<line x1="{px(x)}" y1="{T}" x2="{px(x)}" y2="{H - B}" stroke="#eee"/>')
            svg.append(f'<text x="{px(x)}" y="{H - B + 16}" text-anchor="middle">{x}%</text>')
    step = 5 if ymax - ymin < 60 else 10
    y = math.ceil(ymin / step) * step
    while y <= ymax:
        svg.append(f'<line x1="{L}" y1="{py(y)}" x2="{W - R}" y2="{py(y)}" stroke="{"#999" if y == 0 else "#eee"}"/>')
        svg.append(f'<text x="{L - 6}" y="{py(y) + 4}" text-anchor="end">{y:+.0f}%</text>')
        y += step
    svg.append(f'<text x="{(L + W - R) / 2}" y="{H - 20}" text-anchor="middle">blocks read per (layer, KV head), log scale</text>')
    svg.append(f'<text x="18" y="{(T + H - B) / 2}" transform="rotate(-90 18 {(T + H - B) / 2})" text-anchor="middle">perplexity vs dense</text>')
    for i, (method, pts) in enumerate(sorted(series.items())):
        pts.sort()
        color = COLORS.get(method, "#9467bd")
        path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)
        svg.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2"/>')
        for x, y in pts:
            svg.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" fill="{color}"/>')
        svg.append(f'<line x1="{W - R + 15}" y1="{T + 20 + 20 * i}" x2="{W - R + 40}" y2="{T + 20 + 20 * i}" stroke="{color}" stroke-width="2"/>')
        svg.append(f'<text x="{W - R + 46}" y="{T + 24 + 20 * i}">{method}</text>')
    svg.append("</svg>")
    open(out + ".svg", "w").write("\n".join(svg) + "\n")
    if shutil.which("rsvg-convert"):
        subprocess.run(["rsvg-convert", "-o", out + ".png", out + ".svg"], check=True)
        print(f"wrote {out}.svg and {out}.png")
    else:
        print(f"wrote {out}.svg (install librsvg2-bin for the PNG)")


if __name__ == "__main__":
    main()
