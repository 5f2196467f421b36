"""``kvbench inspect``'s pictures: a self-contained HTML page (hover for each token) and a PNG, one panel per press.

Each panel is a grid: token positions along x (the prompt, then the generated text), forwards along y (0 = the
prefill, then one per decoding step), each cell coloured by the share of (layer, KV head) pairs holding the
token after that forward: ``KEPT`` when all do, ``EVICTED`` when none does, in between mixed; blank where the
token is not yet written. The tokens' text runs above the grid, coloured by what is held at the end.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kvbench.inspection.trace import Retention

KEPT = (31, 111, 178)
EVICTED = (228, 87, 46)


def page_data(panels: list[Retention]) -> list[dict]:
    """What the page draws, embedded in it as JSON (``<script id="kvbench-data">``)."""
    return [{"label": p.label, "tokens": p.tokens, "prompt_tokens": p.prompt_tokens, "slots": p.slots,
             "held": p.held, "finish_reason": p.finish_reason,
             "evicted_at": [p.evicted_at(i) for i in range(len(p.tokens))]} for p in panels]


def write_html(panels: list[Retention], path: Path, title: str) -> Path:
    data = json.dumps(page_data(panels)).replace("</", "<\\/")
    body = _PAGE.replace("__TITLE__", html.escape(title)).replace("__DATA__", data)
    body = body.replace("__KEPT__", f"rgb{KEPT}").replace("__EVICTED__", f"rgb{EVICTED}")
    path.write_text(body, encoding="utf-8")
    return path


def write_png(panels: list[Retention], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import LinearSegmentedColormap

    cmap = LinearSegmentedColormap.from_list("held", [np.array(EVICTED) / 255, np.array(KEPT) / 255])
    cmap.set_bad("white")
    fig, axes = plt.subplots(len(panels), 1, figsize=(12, 3.2 * len(panels)), squeeze=False)
    for ax, panel in zip(axes[:, 0], panels):
        grid = np.array([[np.nan if c is None else c / panel.slots for c in row] for row in panel.held], dtype=float)
        ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
        ax.axvline(panel.prompt_tokens - 0.5, color="black", linewidth=0.8)
        ax.set_title(f"{panel.label}: {_held_at_end(panel)}", fontsize=10, loc="left")
        ax.set_ylabel("forward (0 = prefill)")
    axes[-1, 0].set_xlabel("token position (prompt | generated); blue = held by every layer and head, "
                           "red = evicted from all")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _held_at_end(panel: Retention) -> str:
    shares = [s for s in (panel.final_share(i) for i in range(len(panel.tokens))) if s is not None]
    return (f"{sum(s == 1 for s in shares)} of {len(shares)} tokens held everywhere at the end, "
            f"{sum(s == 0 for s in shares)} evicted everywhere")


_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>__TITLE__</title>
<style>
body { font: 14px system-ui, sans-serif; margin: 16px; color: #222; }
.panel { margin-bottom: 28px; }
.text { font: 12px ui-monospace, monospace; line-height: 1.7; max-height: 9em; overflow: auto; margin: 6px 0; }
.text span { border-radius: 2px; padding: 0 1px; }
canvas { border: 1px solid #ccc; cursor: crosshair; display: block; }
#tip { position: fixed; pointer-events: none; background: #fff; border: 1px solid #888; padding: 4px 6px;
       font: 12px ui-monospace, monospace; display: none; white-space: pre; }
.key span { display: inline-block; width: 12px; height: 12px; vertical-align: middle; margin: 0 4px 0 10px; }
</style></head><body>
<h2>__TITLE__</h2>
<div class="key">after each forward, a token held by<span style="background:__KEPT__"></span>every layer and KV
head<span style="background:__EVICTED__"></span>none (evicted)<span style="background:#fff;border:1px solid #ccc">
</span>not yet written; x: token position (prompt, then generated), y: forward (0 = prefill)</div>
<div id="panels"></div><div id="tip"></div>
<script id="kvbench-data" type="application/json">__DATA__</script>
<script>
const KEPT = [__KEPT_RGB__], EVICTED = [__EVICTED_RGB__];
const panels = JSON.parse(document.getElementById("kvbench-data").textContent);
const tip = document.getElementById("tip");
function colour(share) {
  const c = KEPT.map((k, i) => Math.round(EVICTED[i] + (k - EVICTED[i]) * share));
  return `rgb(${c[0]},${c[1]},${c[2]})`;
}
for (const p of panels) {
  const div = document.createElement("div"); div.className = "panel";
  const h = document.createElement("h3"); h.textContent = p.label + " (" + p.finish_reason + ")"; div.appendChild(h);
  const text = document.createElement("div"); text.className = "text";
  const last = p.held[p.held.length - 1];
  p.tokens.forEach((t, i) => {
    const s = document.createElement("span"); s.textContent = t;
    if (last[i] !== null) { s.style.background = colour(last[i] / p.slots); s.style.color = "#fff"; }
    text.appendChild(s);
  });
  div.appendChild(text);
  const n = p.tokens.length, f = p.held.length;
  const w = Math.max(2, Math.min(8, Math.floor(1200 / n))), r = Math.max(2, Math.min(6, Math.floor(480 / f)));
  const canvas = document.createElement("canvas"); canvas.width = n * w; canvas.height = f * r;
  canvas.className = "grid"; div.appendChild(canvas);
  const ctx = canvas.getContext("2d");
  p.held.forEach((row, y) => row.forEach((c, x) => {
    if (c === null) return; ctx.fillStyle = colour(c / p.slots); ctx.fillRect(x * w, y * r, w, r);
  }));
  ctx.fillStyle = "#000"; ctx.fillRect(p.prompt_tokens * w - 1, 0, 1, canvas.height);
  canvas.addEventListener("mousemove", e => {
    const x = Math.floor(e.offsetX / w), y = Math.floor(e.offsetY / r);
    if (x >= n || y >= f) { tip.style.display = "none"; return; }
    const c = p.held[y][x], ev = p.evicted_at[x];
    tip.textContent = `token ${JSON.stringify(p.tokens[x])} at position ${x}` +
      (x < p.prompt_tokens ? " (prompt)" : ` (output ${x - p.prompt_tokens})`) + `\\nforward ${y}: ` +
      (c === null ? "not yet written" : `held by ${c} of ${p.slots} layer x KV head pairs`) +
      `\\n` + (ev === null ? "never evicted from every layer and head" : `evicted from all after forward ${ev}`);
    tip.style.left = (e.clientX + 14) + "px"; tip.style.top = (e.clientY + 14) + "px"; tip.style.display = "block";
  });
  canvas.addEventListener("mouseleave", () => { tip.style.display = "none"; });
  document.getElementById("panels").appendChild(div);
}
</script></body></html>
"""
_PAGE = _PAGE.replace("__KEPT_RGB__", ",".join(map(str, KEPT))).replace("__EVICTED_RGB__", ",".join(map(str, EVICTED)))
