"""``kvbench inspect``'s pictures: a self-contained HTML page (hover for each token) and a PNG, one panel per press.

Each panel is a grid: token positions along x (the prompt, then the generated text), forwards along y (0 = the
prefill, then one per decoding step), each cell coloured by the share of (layer, KV head) pairs holding the
token after that forward: ``KEPT`` when all do, ``EVICTED`` when none does, in between mixed (``MIXED`` is the
half-way shade the key shows); blank where the token is not yet written, a black line where the prompt ends.
The tokens' text runs above the grid, coloured by what is held at the end.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kvbench.inspection.trace import Retention

KEPT = (31, 111, 178)
EVICTED = (228, 87, 46)
#: The shade of a token held by half the (layer, KV head) pairs: the key's swatch for the mixed cells (rounded
#: as the page's script rounds).
MIXED = tuple(math.floor(e + (k - e) * 0.5 + 0.5) for k, e in zip(KEPT, EVICTED))

#: What each finish reason the decoder gives (``Decoder.finish_reason``) means, in words.
FINISH = {
    "eos": "the model ended its answer itself (it wrote an end-of-sequence token)",
    "stop": "stopped at one of the task's stop strings",
    "loop": "stopped because the output fell into a loop, repeating itself (--stop-on-loop)",
    "repetition": "stopped by the protocol's repetition rule (a short phrase repeated back to back)",
    "length": "stopped at the token limit (--max-new-tokens); the answer may be cut short",
    "forced": "the replayed tokens ran out",
}


def finish_explained(reason: str, generated: int) -> str:
    """The finish reason in words, the reason's own name after it."""
    if reason == "length":
        words = f"stopped at the token limit: {generated} new tokens, the most --max-new-tokens allows; the " \
                "answer may be cut short"
    else:
        words = FINISH.get(reason, "stopped for a reason this page does not know")
    return f'{words} (finish reason "{reason}")' if reason else words


def ticks(count: int, most: int = 8) -> list[int]:
    """Numbered ticks for ``count`` cells from 0: a step of 1, 2 or 5 x 10^k, at most ``most`` ticks."""
    step = 1
    while count > step * most:
        step = _next_step(step)
    return list(range(0, count, step))


def _next_step(step: int) -> int:
    """1 -> 2 -> 5 -> 10 -> 20 -> 50 -> ..."""
    return step * 5 // 2 if str(step)[0] == "2" else step * 2


def page_data(panels: list[Retention]) -> list[dict]:
    """What the page draws, embedded in it as JSON (``<script id="kvbench-data">``): each panel's counts, its
    finish reason in words, its cell size in pixels and the numbered ticks along each axis of its grid."""
    out = []
    for p in panels:
        n, forwards = len(p.tokens), len(p.held)
        width, height = cell_size(n, forwards)
        out.append({"label": p.label, "tokens": p.tokens, "prompt_tokens": p.prompt_tokens, "slots": p.slots,
                    "held": p.held, "finish_reason": p.finish_reason,
                    "finish": finish_explained(p.finish_reason, n - p.prompt_tokens), "cell": [width, height],
                    "ticks": {"x": ticks(n, _room(n * width)), "y": ticks(forwards, _room(forwards * height))},
                    "evicted_at": [p.evicted_at(i) for i in range(n)]})
    return out


def cell_size(tokens: int, forwards: int) -> tuple[int, int]:
    """A grid cell's width and height in pixels: the grid about 1200 x 480, cells 2 to 8 wide, 2 to 6 high."""
    return max(2, min(8, 1200 // max(tokens, 1))), max(2, min(6, 480 // max(forwards, 1)))


def _room(pixels: int) -> int:
    """How many numbered ticks an axis this long takes: at least 24 pixels apart, at most 8."""
    return max(2, min(8, pixels // 24))


def write_html(panels: list[Retention], path: Path, title: str) -> Path:
    data = json.dumps(page_data(panels)).replace("</", "<\\/")
    body = _PAGE.replace("__TITLE__", html.escape(title)).replace("__DATA__", data)
    body = body.replace("__KEPT__", f"rgb{KEPT}").replace("__EVICTED__", f"rgb{EVICTED}")
    body = body.replace("__MIXED__", f"rgb{MIXED}")
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
        finish = finish_explained(panel.finish_reason, len(panel.tokens) - panel.prompt_tokens)
        ax.set_title(f"{panel.label}: {_held_at_end(panel)}\n{finish}", fontsize=9, loc="left")
        ax.set_ylabel("decoding step (0 = prefill)")
    axes[-1, 0].set_xlabel("token position (prompt | generated); blue = held by every layer and KV head, red = "
                           "evicted from all, in between = held by some; white = not yet written")
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
.finish { margin: 0 0 6px; color: #444; }
.text { font: 12px ui-monospace, monospace; line-height: 1.7; white-space: pre-wrap; overflow-wrap: anywhere;
        margin: 6px 0; }
.text span { border-radius: 2px; padding: 0 1px; }
.plot { margin-left: 48px; }
.frame { position: relative; display: inline-block; margin-bottom: 20px; }
canvas { border: 1px solid #ccc; cursor: crosshair; display: block; }
.tick { position: absolute; font: 11px ui-monospace, monospace; color: #444; white-space: nowrap; }
.tick.x { top: 100%; transform: translateX(-50%); padding-top: 5px; }
.tick.x::before { content: ""; position: absolute; left: 50%; top: 0; height: 4px; border-left: 1px solid #444; }
.tick.y { right: 100%; transform: translateY(-50%); padding-right: 7px; }
.tick.y::after { content: ""; position: absolute; right: 1px; top: 50%; width: 4px; border-top: 1px solid #444; }
.axis { font-size: 12px; color: #444; }
#tip { position: fixed; pointer-events: none; background: #fff; border: 1px solid #888; padding: 4px 6px;
       font: 12px ui-monospace, monospace; display: none; white-space: pre; }
.key .entry { display: inline-block; margin: 2px 14px 2px 0; }
.key .swatch { display: inline-block; width: 12px; height: 12px; vertical-align: middle; margin-right: 4px; }
</style></head><body>
<h2>__TITLE__</h2>
<div class="key">Each grid: a row per forward (0 = the prefill, then one per decoding step), a column per token
position (the prompt, then the generated text); each cell shows how many (layer, KV head) pairs hold the token
after that forward (hover for the counts).<br>
<span class="entry"><span class="swatch" style="background:__KEPT__"></span>kept: held by every layer and KV
head</span>
<span class="entry"><span class="swatch" style="background:__MIXED__"></span>mixed: held by some (layer, KV head)
pairs, evicted from the others (the bluer, the more of them hold it; this swatch: half)</span>
<span class="entry"><span class="swatch" style="background:__EVICTED__"></span>evicted: held by no layer or
head</span>
<span class="entry"><span class="swatch" style="background:#fff;border:1px solid #ccc;width:10px;height:10px">
</span>not yet written</span>
<span class="entry"><span class="swatch" style="background:#000;width:2px"></span>end of the prompt</span><br>
The text above each grid is coloured the same way, by what is held after the last forward.</div>
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
function element(tag, className, text) {
  const e = document.createElement(tag); e.className = className;
  if (text !== undefined) e.textContent = text;
  return e;
}
function axes(frame, p, w, r) {
  p.ticks.x.forEach(v => { const t = element("span", "tick x", v); t.style.left = (1 + (v + 0.5) * w) + "px";
                           frame.appendChild(t); });
  p.ticks.y.forEach(v => { const t = element("span", "tick y", v); t.style.top = (1 + (v + 0.5) * r) + "px";
                           frame.appendChild(t); });
}
for (const p of panels) {
  const div = element("div", "panel");
  div.appendChild(element("h3", "", p.label));
  div.appendChild(element("p", "finish", "Finished: " + p.finish));
  const text = element("div", "text");
  const last = p.held[p.held.length - 1];
  p.tokens.forEach((t, i) => {
    const s = document.createElement("span"); s.textContent = t;
    if (last[i] !== null) { s.style.background = colour(last[i] / p.slots); s.style.color = "#fff"; }
    text.appendChild(s);
  });
  div.appendChild(text);
  const n = p.tokens.length, f = p.held.length;
  const [w, r] = p.cell;
  const plot = element("div", "plot"), frame = element("div", "frame");
  plot.appendChild(element("div", "axis y", "\u2193 decoding step (0 = the prefill)"));
  const canvas = element("canvas", "grid"); canvas.width = n * w; canvas.height = f * r;
  frame.appendChild(canvas); axes(frame, p, w, r); plot.appendChild(frame);
  plot.appendChild(element("div", "axis x", "token position \u2192 (prompt, then generated)"));
  div.appendChild(plot);
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
