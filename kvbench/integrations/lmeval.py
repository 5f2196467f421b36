"""kvbench inside lm-evaluation-harness: ``--model kvbench`` is lm-eval's ``HFLM`` whose generation runs kvbench's
engine (batched, with eviction), as ``steered`` (lm-eval's ``hf_steered.py``) overrides only the calls it changes.

Importing this module registers the class with lm-eval's ``@register_model``; ``kvbench lm-eval ARGS`` imports it
and runs lm-eval's own command line on ARGS unchanged, and the entry point ``lm_eval.models: kvbench`` lets a
release of lm-eval that discovers plug-ins find it alone. Model arguments (``--model_args``) beyond HFLM's:

- ``pretrained``: anything ``kvbench run --model`` takes (an alias such as ``smollm2-135m`` or ``tiny-llama``, an HF
  id, a directory, a ``.gguf``), loaded the way ``kvbench run`` loads it;
- ``dtype`` and ``device`` as ``kvbench run`` takes them (``auto``: bf16 on a GPU; lm-eval's ``--device`` is used);
- ``press`` (default ``full``), ``budget`` (KV entries per layer and KV head; unset = the full cache), and
  ``press_args``: the press's parameters as ``key:value`` pairs joined by ``;`` (lm-eval splits model arguments on
  ``,`` and ``=``), e.g. ``press_args=window_size:16;pooling:max``.

``loglikelihood`` tasks score a fixed continuation in one forward pass, with nothing decoded to evict in: with a
budget they are refused; without one they run as HFLM runs them. kvbench's telemetry for each generated sample (the
press, budget, output tokens, evicted entries, peak KV bytes, why it stopped) is appended to the request's
``arguments``, the only per-request field lm-eval writes to its per-sample logs (``--log_samples``).
"""

from __future__ import annotations

from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from kvbench.errors import ConfigError


def parse_press_args(text: str | None) -> dict[str, str]:
    """``key:value;key:value`` (the form that survives lm-eval's ``--model_args`` parsing) as a dict."""
    out = {}
    for item in (text or "").split(";"):
        if not item.strip():
            continue
        key, sep, value = item.partition(":")
        if not sep or not key.strip():
            raise ConfigError(f"press_args item {item!r} is not key:value (items joined by ';')")
        out[key.strip()] = value.strip()
    return out


def parse_budget(text) -> int | None:
    """``budget`` as ``kvbench run -b`` takes it: an integer >= 1, or full/none/unset for the full cache."""
    if text is None or str(text).strip().lower() in ("", "none", "full"):
        return None
    try:
        budget = int(str(text).strip())
    except ValueError:
        raise ConfigError(f"budget={text!r} in --model_args is not an integer (or full)") from None
    if budget < 1:
        raise ConfigError(f"budget={budget} in --model_args must be >= 1 (or full)")
    return budget


def prepared_arguments(args: list[str]) -> list[str]:
    """lm-eval's arguments checked for kvbench's model before anything loads (its press, budget, and that every
    task is known and, under a budget, generative), with ``--device auto`` where none is given (as ``kvbench
    run`` picks the device)."""
    from kvbench.presses import make_checked_press

    if _option(args, "--model") == "kvbench":
        model_args = dict(item.split("=", 1) for item in (_option(args, "--model_args") or "").split(",")
                          if "=" in item)
        budget = parse_budget(model_args.get("budget"))
        press = make_checked_press(model_args.get("press", "full"), parse_press_args(model_args.get("press_args")))
        if press.evicts and budget is None:
            raise ConfigError(f"press {press.name!r} evicts: give budget=N (N >= 1) in --model_args")
        _check_tasks(_option(args, "--tasks"), _option(args, "--include_path"), press.evicts)
    has_device = any(a == "--device" or a.startswith("--device=") for a in args)
    return args if has_device else [*args, "--device", "auto"]


def _option(args: list[str], flag: str) -> str | None:
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(f"{flag}="):
            return arg.split("=", 1)[1]
    return None


def _check_tasks(tasks: str | None, include_path: str | None, evicts: bool) -> None:
    """Every task name is one lm-eval knows; under a budget, none scores by log-likelihood."""
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._yaml_loader import load_yaml

    names = [t for t in (tasks or "").split(",") if t and not t.endswith(".yaml")]
    if not names:
        return
    manager = TaskManager(include_path=include_path)
    for name in names:
        matched = manager.match_tasks([name])
        if not matched:
            raise ConfigError(f"--tasks {name!r}: lm-eval knows no such task (`lm-eval ls tasks` lists them)")
        for task in matched if evicts else ():
            entry = manager.task_index.get(task)
            path = getattr(entry, "yaml_path", None)
            kind = load_yaml(path, resolve_func=False, recursive=True).get("output_type") if path else None
            if kind not in (None, "generate_until"):
                raise ConfigError(f"task {task} is {kind}: it scores continuations by log-likelihood in one "
                                  "forward pass, with no decoding to evict in. Run it without a budget or choose "
                                  "generative tasks")


@register_model("kvbench")
class KvbenchLM(HFLM):
    """HFLM with kvbench's decoding engine and a press at a budget for ``generate_until``."""

    def __init__(self, pretrained="smollm2-135m", press: str = "full", budget: int | str | None = None,
                 press_args: str | None = None, dtype: str = "auto", seed: int = 0, **kwargs) -> None:
        from kvbench.presses import make_checked_press

        self.press = make_checked_press(press, parse_press_args(press_args))
        self.budget = parse_budget(budget)
        if self.press.evicts and (self.budget is None or self.budget < 1):
            raise ConfigError(f"press {press!r} evicts: give budget=N (N >= 1) in --model_args")
        if self.press.evicts:
            self.press.cadence(self.budget)  # a budget below the press's windows fails here, before the model loads
        self.seed = seed
        if isinstance(pretrained, str):
            from kvbench.models import load

            loaded = load(pretrained, dtype=dtype, device=kwargs.get("device") or "auto", seed=seed)
            kwargs.setdefault("tokenizer", loaded.tokenizer)
            kwargs["device"] = str(loaded.device)
            pretrained = loaded.model
        super().__init__(pretrained=pretrained, **kwargs)
        self.telemetry: dict[tuple[int, ...], dict] = {}

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        self._refuse_scoring(requests)
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        self._refuse_scoring(requests)
        return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm)

    def _refuse_scoring(self, requests) -> None:
        if self.press.evicts:
            tasks = sorted({r.task_name for r in requests if r.task_name}) or ["?"]
            raise ConfigError(f"task(s) {', '.join(tasks)} score continuations by log-likelihood: one forward pass, "
                              f"no decoding for {self.press.name} to evict in. Run them without a budget (the full "
                              "cache) or choose generative tasks")

    def generate_until(self, requests, disable_tqdm: bool = False):
        results = super().generate_until(requests, disable_tqdm=disable_tqdm)
        for request in requests:  # the per-sample logs show `arguments`: the telemetry goes there
            key = tuple(self.tok_encode(request.args[0]))
            if key in self.telemetry:
                request.arguments = (*request.args, {"kvbench": self.telemetry[key]})
        return results

    def _model_generate(self, context, max_length: int, stop: list[str], **generation_kwargs):
        """The prompts (left padding removed) decoded by kvbench's engine; returned as HF ``generate`` returns
        them: the padded context, then each sequence's tokens, padded to the longest."""
        import torch

        from kvbench.engine.generate import GenerationSettings, generate

        mask = generation_kwargs.pop("attention_mask", None)
        rows = context.tolist() if mask is None else [
            [t for t, m in zip(ids, keep) if m] for ids, keep in zip(context.tolist(), mask.tolist())]
        sample = bool(generation_kwargs.get("do_sample")) or float(generation_kwargs.get("temperature") or 0.0) > 0
        settings = GenerationSettings(
            max_new_tokens=max_length - context.shape[1],
            temperature=float(generation_kwargs.get("temperature") or 1.0) if sample else 0.0,
            top_p=float(generation_kwargs.get("top_p") or 1.0), top_k=int(generation_kwargs.get("top_k") or 0),
            seed=self.seed, eos_token_ids=(self.eot_token_id,), stop_strings=tuple(stop),
        )
        from kvbench.presses import for_tokenizer

        press = for_tokenizer(self.press, self.tokenizer)
        outputs = generate(self.model, rows, press, self.budget, settings, detokenize=self.tok_decode,
                           pad_token_id=self.tokenizer.pad_token_id or 0)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eot_token_id
        width = max(len(o.tokens) for o in outputs)
        tails = [o.tokens + [pad] * (width - len(o.tokens)) for o in outputs]
        for row, out in zip(rows, outputs):
            self.telemetry[tuple(row)] = {
                "press": self.press.name, "budget": self.budget, "output_tokens": out.output_tokens,
                "finish_reason": out.finish_reason, "evicted_tokens": int(out.evicted_tokens),
                "peak_kv_bytes": int(out.peak_kv_bytes), "tokens_per_s": round(out.tokens_per_s, 2),
            }
        return torch.cat([context, torch.tensor(tails, dtype=context.dtype, device=context.device)], dim=1)

    def get_model_info(self) -> dict:
        return {**super().get_model_info(), "kvbench_press": self.press.name, "kvbench_budget": self.budget,
                "kvbench_press_args": self.press.params()}
