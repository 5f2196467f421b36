from __future__ import annotations

import typer


def calibrate(
    model: str = typer.Option("smollm2-135m", "--model", "-m", help="Model to calibrate: a known name, hub id, "
                              "directory or GGUF file (as --model takes it everywhere)."),
    text: str = typer.Option(..., "--text", "-t", help="A plain-text file of natural, coherent text (prose, code "
                             "or maths; TriAttention finds the domain does not matter). rlkv: the haystack its "
                             "passkey samples are made of."),
    out: str = typer.Option(..., "--out", "-o", help="Where to write the file: -a stats=FILE (triattention, .pt) "
                            "or -a gates=FILE (rlkv, .tsv)."),
    press: str = typer.Option("triattention", "--press", "-p", help="triattention (its query statistics) or rlkv "
                              "(head gates by DuoAttention's optimisation)."),
    max_tokens: int = typer.Option(32768, "--max-tokens", help="triattention: tokens of the text one forward reads "
                                   "(TriAttention's --max-length)."),
    steps: int = typer.Option(2000, "--steps", help="rlkv: optimisation steps (DuoAttention: 2000)."),
    sink: int = typer.Option(128, "--sink", help="rlkv: sink tokens of the streaming attention (DuoAttention: 128)."),
    recent: int = typer.Option(256, "--recent", help="rlkv: recent tokens of the streaming attention (256)."),
    context_min: int = typer.Option(1000, "--context-min", help="rlkv: shortest haystack of a sample (1000)."),
    context_max: int = typer.Option(32000, "--context-max", help="rlkv: longest haystack of a sample (32000)."),
    passkeys: int = typer.Option(10, "--passkeys", help="rlkv: passkeys per sample (10)."),
    passkey_length: int = typer.Option(32, "--passkey-length", help="rlkv: words per passkey (32)."),
    lr: float = typer.Option(0.02, "--lr", help="rlkv: AdamW's learning rate (0.02)."),
    reg_weight: float = typer.Option(0.05, "--reg-weight", help="rlkv: weight of the gates' L1 penalty (0.05)."),
    seed: int = typer.Option(0, "--seed", help="rlkv: the samples' seed."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or mps."),
    dtype: str = typer.Option("auto", "--dtype", help="auto, float32, bfloat16 or float16."),
) -> None:
    """Write the per-model data a press reads. triattention: one forward over the text, and per layer, query head
    and RoPE frequency the pre-RoPE queries' complex mean and mean modulus, in the layout of the files TriAttention
    ships (which -a stats= reads as well). rlkv: a gate per KV head by DuoAttention's optimisation on passkey
    samples made from the text (RLKV learns its gates by RL training, which kvbench does not run), in the layout of
    DuoAttention's full_attention_heads.tsv."""
    from kvbench.cli.progress import progress_bar
    from kvbench.runs.calibrate import CalibrationConfig, validate
    from kvbench.runs.calibrate import calibrate as run_calibration
    from kvbench.runs.duo_gates import GateTraining

    training = GateTraining(sink=sink, recent=recent, steps=steps, lr=lr, reg_weight=reg_weight,
                            context_min=context_min, context_max=context_max, passkeys=passkeys,
                            passkey_length=passkey_length, seed=seed)
    config = CalibrationConfig(model=model, text=text, out=out, press=press, max_tokens=max_tokens, device=device,
                               dtype=dtype, training=training)
    validate(config)  # bad input fails before the model loads
    with progress_bar(transient=True) as progress:
        bar = progress.add_task("optimising gates", total=steps if press == "rlkv" else 0)
        payload = run_calibration(config, on_step=lambda step, loss: progress.update(
            bar, completed=step, description=f"optimising gates (loss {loss:.4f})"))
    typer.echo(_summary(press, out, text, payload))


def _summary(press: str, out: str, text: str, payload: dict) -> str:
    if press == "rlkv":
        gates, losses = payload["gates"], payload["losses"]
        return (f"wrote {out}: gates of {gates.shape[0]} layers x {gates.shape[1]} KV heads (from {gates.min():.3f} "
                f"to {gates.max():.3f}, mean {gates.mean():.3f}; rlkv's -a sparsity picks the heads kept whole by "
                f"rank); loss {losses[0]:.4f} -> {losses[-1]:.4f} over {len(losses)} step(s)")
    meta = payload["metadata"]
    layers = 1 + max(layer for layer, _ in meta["sampled_heads"])
    return (f"wrote {out}: {len(meta['sampled_heads'])} query heads over {layers} layers, head dim "
            f"{meta['head_dim']}, from {meta['tokens']} tokens of {text}")
