"""`kvbench inspect`: the grid it draws is what the cache held, step by step, and a real browser renders it."""

import json
import os
import re
import shutil
import subprocess

import pytest

from kvbench.inspection.render import EVICTED, KEPT, write_html
from kvbench.inspection.trace import InspectConfig, inspect, plan
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
        counts[name] = (_pixels_near(image, KEPT), _pixels_near(image, EVICTED))
    expected = {name: _grid_pixels(_page_data(page)[0]) for name, page in pages.items()}
    kept, evicted = counts["h2o"]
    assert evicted >= 0.9 * expected["h2o"][1] > 0 and kept >= 0.9 * expected["h2o"][0] > 0
    # The full cache: a grid with nothing evicted (its only red pixels are the key's 12 x 12 swatch)
    assert counts["full"][0] >= 0.9 * expected["full"][0] > 0 and expected["full"][1] == 0
    assert counts["full"][1] <= 12 * 12


def _grid_pixels(panel: dict) -> tuple[int, int]:
    """Pixels the page's grid paints in the kept and in the evicted colour (cell sizes as the page computes)."""
    n, forwards = len(panel["tokens"]), len(panel["held"])
    cell = max(2, min(8, 1200 // n)) * max(2, min(6, 480 // forwards))
    cells = [c for row in panel["held"] for c in row if c is not None]
    return cell * sum(c == panel["slots"] for c in cells), cell * sum(c == 0 for c in cells)
