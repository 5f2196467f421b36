"""`kvbench inspect`: the grid it draws is what the cache held, step by step, and a real browser renders it."""

import json
import os
import re
import shutil
import subprocess

import pytest

from kvbench.inspection.render import EVICTED, FINISH, KEPT, MIXED, page_data, ticks, write_html
from kvbench.inspection.trace import InspectConfig, Retention, inspect, plan
from kvbench.runs.plan import RunConfig
from tests.test_cli import kvbench

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


def _config(presses=("h2o", "full"), budget=16, example=1) -> InspectConfig:
    run = RunConfig(model="tiny-llama", presses=presses, budgets=(budget,), dataset="arith", max_new_tokens=30)
    return InspectConfig(run=run, example=example)


def _page_data(path) -> list[dict]:
    text = path.read_text()
    return json.loads(re.search(r'<script id="kvbench-data" type="application/json">(.*?)</script>', text,
                                re.S).group(1))


def _kept_sets_by_hook(config: InspectConfig, press_name: str, budget: int | None) -> list[list[list[set]]]:
    """Independently of inspect: the kept sets of every (layer, KV head) after every forward."""
    from kvbench.engine.generate import generate
    from kvbench.presses import make_press
    from kvbench.runs.runner import generation_settings
    from kvbench.runs.session import load_session

    task, example, _ = plan(config)
    session = load_session("tiny-llama", "auto", "auto", 0)
    codec = session.codec(task)
    kept: list = []
    generate(session.loaded.model, [codec.encode(codec.prompt(example))], make_press(press_name), budget,
             generation_settings(session, config.run, task), detokenize=codec.decode,
             on_step=lambda cache, step: kept.append(cache.kept_positions(0)))
    return kept


def test_grid_in_the_page_equals_the_kept_sets_recorded_step_by_step(tmp_path):
    config = _config()
    page = write_html(inspect(config), tmp_path / "inspect.html", "test")
    h2o, full = _page_data(page)
    kept = _kept_sets_by_hook(config, "h2o", 16)
    assert len(h2o["held"]) == len(kept)
    for forward, (row, layers) in enumerate(zip(h2o["held"], kept)):
        heads = [head for layer in layers for head in layer]
        assert h2o["slots"] == len(heads)
        for position, count in enumerate(row):
            expected = sum(position in head for head in heads)
            if count is None:  # not yet written: no head holds it
                assert expected == 0 and position >= h2o["prompt_tokens"] + forward
            else:
                assert count == expected, (forward, position)
    assert any(c == 0 for c in h2o["held"][-1] if c is not None)  # h2o at 16 did evict
    # The full cache keeps everything: no cell shows an eviction
    assert all(c == full["slots"] for row in full["held"] for c in row if c is not None)
    assert all(e is None for e in full["evicted_at"])


def test_inspect_command_writes_the_page_the_picture_and_the_text(tmp_path):
    result = kvbench("inspect", "--model", "tiny-llama", "-d", "arith", "-p", "streaming_llm", "-b", "12",
                     "--max-new-tokens", "20", "--out", str(tmp_path / "pics"))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "pics" / "inspect.png").stat().st_size > 10_000
    (panel,) = _page_data(tmp_path / "pics" / "inspect.html")
    assert panel["label"] == "streaming_llm @ 12" and "dim = evicted" in result.stdout.replace("\n", " ")


def _pixels_near(image, colour, tolerance=4) -> int:
    import numpy as np

    rgb = (image[..., :3] * 255).round() if image.dtype.kind == "f" else image[..., :3]
    return int((np.abs(rgb - np.array(colour)) <= tolerance).all(axis=-1).sum())


@pytest.mark.skipif(CHROMIUM is None and not os.environ.get("KVBENCH_REQUIRE_BROWSER"),
                    reason="no Chromium here (CI installs it and sets KVBENCH_REQUIRE_BROWSER)")
def test_a_real_browser_renders_the_kept_and_evicted_grid(tmp_path):
    from matplotlib.image import imread

    assert CHROMIUM is not None, "KVBENCH_REQUIRE_BROWSER is set but no chromium is installed"
    pages = {name: write_html(inspect(_config(presses=(name,))), tmp_path / f"{name}.html", name)
             for name in ("h2o", "full")}
    counts = {}
    for name, page in pages.items():
        shot = tmp_path / f"{name}.png"
        subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        f"--screenshot={shot}", "--window-size=1400,1400", page.as_uri()],
                       check=True, timeout=180, capture_output=True)
        image = imread(shot)
        counts[name] = (_pixels_near(image, KEPT), _pixels_near(image, EVICTED), _pixels_near(image, MIXED, 1))
        _check_rendered(page, _probe(page, tmp_path))
    expected = {name: _grid_pixels(_page_data(page)[0]) for name, page in pages.items()}
    kept, evicted, _ = counts["h2o"]
    assert evicted >= 0.9 * expected["h2o"][1] > 0 and kept >= 0.9 * expected["h2o"][0] > 0
    # The full cache: a grid with nothing evicted (its only red pixels are the key's 12 x 12 swatch)
    assert counts["full"][0] >= 0.9 * expected["full"][0] > 0 and expected["full"][1] == 0
    assert counts["full"][1] <= 12 * 12
    # ... and nothing mixed, yet the key still shows the mixed swatch
    assert 12 * 12 <= counts["full"][2] <= 12 * 12 + 24


def _grid_pixels(panel: dict) -> tuple[int, int]:
    """Pixels the page's grid paints in the kept and in the evicted colour (cell sizes as the page computes)."""
    cell = panel["cell"][0] * panel["cell"][1]
    cells = [c for row in panel["held"] for c in row if c is not None]
    return cell * sum(c == panel["slots"] for c in cells), cell * sum(c == 0 for c in cells)


def _panel(prompt=300, generated=60, slots=8, reason="length", label="h2o @ 64") -> Retention:
    """A made-up panel: some tokens held everywhere, some by a few pairs, some by none; long text."""
    n = prompt + generated
    held = [[None if p >= prompt + f else slots if p < 4 or p >= prompt + f - 20 else (p * 7 + f) % (slots + 1)
             for p in range(n)] for f in range(generated + 1)]
    return Retention(label, [f"w{i} " if i % 37 else "line\n" for i in range(n)], prompt, slots, held, reason)


def test_ticks_are_few_round_and_cover_the_axis():
    for count in (1, 5, 8, 9, 17, 61, 120, 260, 1234, 40_000):
        marks = ticks(count)
        step = marks[1] - marks[0] if len(marks) > 1 else 1
        assert marks[0] == 0 and marks[-1] < count <= marks[-1] + step and len(marks) <= 8, count
        assert marks == list(range(0, count, step)) and int(str(step)[0]) in (1, 2, 5) and \
            set(str(step)[1:]) <= {"0"}, (count, marks)
        assert len(marks) >= min(count, 3), (count, marks)  # a few, not one
    (data,) = page_data([_panel()])
    assert data["ticks"] == {"x": [0, 50, 100, 150, 200, 250, 300, 350], "y": [0, 10, 20, 30, 40, 50, 60]}
    (short,) = page_data([_panel(prompt=30, generated=12)])  # 13 forwards x 6 pixels: 3 ticks, 30 pixels apart
    assert short["cell"] == [8, 6] and short["ticks"]["y"] == [0, 5, 10]


def test_every_finish_reason_the_decoder_gives_is_explained():
    import inspect as source

    from kvbench.engine.decode import Decoder

    reasons = set(re.findall(r'return "(\w+)"|"(\w+)" if', source.getsource(Decoder.finish_reason)))
    reasons = {a or b for a, b in reasons}
    assert reasons == {"forced", "eos", "stop", "loop", "repetition", "length"}
    assert reasons <= set(FINISH)
    for reason in reasons:
        (data,) = page_data([_panel(generated=30, reason=reason)])
        assert data["finish"].endswith(f'(finish reason "{reason}")') and len(data["finish"]) > 40
    (data,) = page_data([_panel(generated=30, reason="length")])
    assert data["finish"].startswith("stopped at the token limit: 30 new tokens") and "--max-new-tokens" in \
        data["finish"]


def test_the_page_keys_every_colour_and_lets_the_text_grow(tmp_path):
    page = write_html([_panel()], tmp_path / "p.html", "made up").read_text()
    key = page.split('<div class="key">', 1)[1].split("</div>", 1)[0]
    for colour, words in ((KEPT, "kept: held by every layer"), (MIXED, "mixed: held by some"),
                          (EVICTED, "evicted: held by no layer"), ((255, 255, 255), "not yet written"),
                          ((0, 0, 0), "end of the prompt")):
        swatch = f"background:rgb{colour}" if colour not in ((255, 255, 255), (0, 0, 0)) else \
            f"background:#{'fff' if colour[0] else '000'}"
        entry = next(e for e in key.split('<span class="entry">')[1:] if swatch in e)
        assert words in " ".join(entry.split()), entry
    assert MIXED == (130, 99, 112)  # half-way between EVICTED and KEPT, rounded as the page's script rounds
    style = page.split("<style>", 1)[1].split("</style>", 1)[0]
    text_rule = next(line for line in style.splitlines() if line.startswith(".text {"))
    assert "max-height" not in style and "9em" not in style and "pre-wrap" in text_rule
    assert '"finish": "stopped at the token limit: 60 new tokens' in page


def _probe(page, tmp_path) -> dict:
    """The page as a real browser lays it out: each grid's pixels and ticks, the key, the text boxes."""
    probed = tmp_path / f"probed-{page.name}"
    probed.write_text(page.read_text().replace("</body>", _PROBE + "</body>"))
    dom = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1400,1400",
                          "--dump-dom", probed.as_uri()], check=True, timeout=180, capture_output=True, text=True)
    import html

    return json.loads(html.unescape(re.search(r'<pre id="probe">(.*?)</pre>', dom.stdout, re.S).group(1)))


_PROBE = """<script>
const box = e => { const r = e.getBoundingClientRect(); return [r.left, r.top, r.right, r.bottom]; };
const out = {panels: [], legend: [...document.querySelectorAll(".key .entry")].map(e =>
  [getComputedStyle(e.querySelector(".swatch")).backgroundColor, e.textContent.replace(/\\s+/g, " ").trim()])};
for (const panel of document.querySelectorAll(".panel")) {
  const canvas = panel.querySelector("canvas"), text = panel.querySelector(".text");
  const pixels = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data, colours = new Set();
  for (let i = 0; i < pixels.length; i += 4) colours.add([0, 1, 2, 3].map(k => pixels[i + k]).join(","));
  out.panels.push({canvas: box(canvas), colours: [...colours], finish: panel.querySelector(".finish").textContent,
    x: [...panel.querySelectorAll(".tick.x")].map(t => [t.textContent, ...box(t)]),
    y: [...panel.querySelectorAll(".tick.y")].map(t => [t.textContent, ...box(t)]),
    axes: [...panel.querySelectorAll(".axis")].map(a => [a.textContent, ...box(a)]),
    text: {client: text.clientHeight, scroll: text.scrollHeight, box: box(text), last: box(text.lastElementChild),
           font: parseFloat(getComputedStyle(text).fontSize)}});
}
const pre = document.createElement("pre"); pre.id = "probe"; pre.textContent = JSON.stringify(out);
document.body.appendChild(pre);
</script>"""


def _check_rendered(page, probe: dict) -> None:
    """Ticks on the cells they name, axis titles, a key swatch for every colour a grid paints, all text shown."""
    legend = {tuple(int(v) for v in re.findall(r"\d+", colour)[:3]): words for colour, words in probe["legend"]}
    for data, shown in zip(_page_data(page), probe["panels"], strict=True):
        w, r = data["cell"]
        left, top, right, bottom = shown["canvas"]
        for axis, cell, origin, along in (("x", w, left, 0), ("y", r, top, 1)):
            marks = shown[axis]
            assert [int(m[0]) for m in marks] == data["ticks"][axis] and 2 <= len(marks) <= 8, (axis, marks)
            for label, *edges in marks:  # centred on its cell, outside the grid, labels apart
                assert abs((edges[along] + edges[along + 2]) / 2 - (origin + 1 + (int(label) + 0.5) * cell)) <= 1
                assert edges[1] >= bottom - 1 if axis == "x" else edges[2] <= left + 1
            assert all(a[1 + along + 2] <= b[1 + along] for a, b in zip(marks, marks[1:])), marks
        titles = " ".join(a[0] for a in shown["axes"])
        assert "token position" in titles and "decoding step" in titles
        for colour in shown["colours"]:
            rgba = tuple(int(v) for v in colour.split(","))
            assert _key_for(rgba) in legend, (colour, legend)
        assert shown["finish"] == "Finished: " + data["finish"]
        text = shown["text"]
        assert text["scroll"] <= text["client"] and text["last"][3] <= text["box"][3] + 1  # nothing cut off


def _key_for(rgba: tuple) -> tuple:
    """The key's swatch that explains a grid pixel: kept, evicted, end of prompt, not yet written, or mixed."""
    rgb, alpha = rgba[:3], rgba[3]
    if alpha == 0:
        return (255, 255, 255)
    if rgb in (KEPT, EVICTED, (0, 0, 0)):
        return rgb
    share = (rgb[0] - EVICTED[0]) / (KEPT[0] - EVICTED[0])
    assert 0 < share < 1 and all(abs(e + (k - e) * share - c) <= 1 for k, e, c in zip(KEPT, EVICTED, rgb)), rgb
    return MIXED


@pytest.mark.skipif(CHROMIUM is None and not os.environ.get("KVBENCH_REQUIRE_BROWSER"),
                    reason="no Chromium here (CI installs it and sets KVBENCH_REQUIRE_BROWSER)")
def test_a_real_browser_shows_ticks_the_key_the_whole_text_and_why_it_stopped(tmp_path):
    assert CHROMIUM is not None, "KVBENCH_REQUIRE_BROWSER is set but no chromium is installed"
    panels = [_panel(), _panel(prompt=30, generated=12, reason="eos", label="snapkv @ 64")]
    page = write_html(panels, tmp_path / "made-up.html", "made up")
    probe = _probe(page, tmp_path)
    _check_rendered(page, probe)
    long_text = probe["panels"][0]["text"]
    assert long_text["client"] > 9 * long_text["font"] * 1.7  # taller than the old 9em box: it grew
    assert {_key_for(tuple(map(int, c.split(",")))) for c in probe["panels"][0]["colours"]} == \
        {KEPT, MIXED, EVICTED, (0, 0, 0), (255, 255, 255)}
    assert "60 new tokens" in probe["panels"][0]["finish"] and "end-of-sequence" in probe["panels"][1]["finish"]
