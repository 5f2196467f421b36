from __future__ import annotations


def models() -> None:
    """List the known models and what their cards say a run needs: system prompt, think block, dtype, EOS
    tokens, recommended decoding and the paper's settings. Other models run with their own chat template."""
    from rich.console import Console
    from rich.table import Table

    from kvbench.models import MODELS_TABLE, known_models

    table = Table(title=f"known models ({MODELS_TABLE.name}; any other hub id or directory works too)",
                  show_lines=True)
    for column in ("model", "system prompt", "opens <think>", "dtype", "EOS tokens", "recommended", "paper",
                   "note"):
        table.add_column(column, style="bold" if column == "model" else None, no_wrap=column == "model")
    for entry in known_models():
        name = "\n".join([entry["id"], *(f"alias {a}" for a in entry.get("aliases", []))])
        table.add_row(name, repr(entry["system_prompt"]) if entry["system_prompt"] else "none",
                      "yes" if entry["opens_think"] else "no", entry["dtype"], " ".join(entry["eos"]),
                      _settings(entry["recommended"]), _settings(entry["paper"]) if entry["paper"] else "-",
                      entry.get("note", ""))
    Console(width=180).print(table)


def _settings(values: dict) -> str:
    return "\n".join(f"{key}={','.join(map(str, v)) if isinstance(v, list) else v}" for key, v in values.items())
