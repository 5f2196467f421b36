"""The options `run` and `fidelity` share, declared once (typer reads them from the commands' annotations)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

Model = Annotated[str, typer.Option(help="HF id, local directory, .gguf file, or alias: smollm2-135m, tiny-llama, "
        "tiny-qwen2.")]
Press = Annotated[list[str], typer.Option("--press", "-p", help="Eviction policy; repeat or comma-separate to "
        "compare several (see `kvbench presses`).")]
Budget = Annotated[list[str], typer.Option("--budget", "-b", help="KV entries kept per layer per KV head, prompt "
        "included; repeat for several; 'full' = no eviction.")]
PressArg = Annotated[list[str], typer.Option("--press-arg", "-a", help="Press parameter key=value (every press that "
        "has it) or press.key=value; repeatable.")]
Dataset = Annotated[str, typer.Option("--dataset", "-d", help="Dataset config name (`kvbench datasets list`; "
        "datasets_cfg/).")]
NumSamples = Annotated[int | None, typer.Option("--num-samples", "-n", help="Use a fixed seeded subset of N examples "
        "(the same for every press and budget).")]
MaxNewTokens = Annotated[int | None, typer.Option(help="Generation limit (default: the dataset's).")]
Seed = Annotated[int, typer.Option(help="Seed for sampling and seeded presses.")]
Protocol = Annotated[str, typer.Option(help="Everything outside the cache that shapes the numbers: kvbench (chat "
        "template, faithful scorers) or hott / hott-sampling (the paper's harness as its code ran; see the README's "
        "protocol table).")]
SystemPrompt = Annotated[str | None, typer.Option(help="System prompt under the chat template (default: the model's "
        "own, e.g. Nemotron's 'detailed thinking on'; '' = none).")]
Temperature = Annotated[float | None, typer.Option(help="0 = greedy (default: the protocol's; greedy but "
        "hott-sampling).")]
TopP = Annotated[float | None, typer.Option(help="Nucleus sampling threshold (with --temperature > 0).")]
TopK = Annotated[int | None, typer.Option(help="Sample among the k most likely tokens (0 = all).")]
RepetitionPenalty = Annotated[float | None, typer.Option(help="transformers' repetition penalty (1 = none).")]
Store = Annotated[Path, typer.Option(help="Parquet result store directory.")]
Dtype = Annotated[str, typer.Option(help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16.")]
Device = Annotated[str, typer.Option(help="auto (cuda if present), cpu, cuda, cuda:N.")]
DataDir = Annotated[Path | None, typer.Option(help="Local data <dir>/<name>/<split>.jsonl instead of the hub "
        "(default: $KVBENCH_DATA_DIR).")]
DatasetRevision = Annotated[str | None, typer.Option(help="Hub revision of the dataset (commit, branch or tag; "
        "default: the dataset YAML's). The commit read is stored.")]
BatchSize = Annotated[int, typer.Option(help="Sequences decoding at once (evicted per sequence).")]
Batching = Annotated[str, typer.Option(help="continuous: a finished sequence's row takes the next example at once; "
        "static: a batch decodes until its longest sequence ends. Outputs are the same, token for token; only speed "
        "differs (stored in column 'batching').")]
RetryFailed = Annotated[bool, typer.Option("--retry-failed", help="Rerun examples recorded as failed.")]
Measure = Annotated[list[str], typer.Option("--measure", help="Extra measurement, repeatable: attention-loss "
        "(attention mass on evicted entries, exact against a shadow full cache); retention (share of the question's "
        "numbers, names and option labels held); fidelity (the full cache's response replayed under the press: top-1 "
        "agreement and KL; the table then ranks the presses by it).")]
StopOnLoop = Annotated[bool, typer.Option("--stop-on-loop", help="End a generation that falls into repetition "
        "(finish reason 'loop'); loops are measured either way.")]
Compile = Annotated[bool, typer.Option("--compile", help="Run every decoding step as one torch.compile graph "
        "(fullgraph, static shapes: the model's forward, the cache write, the press's scoring and eviction); the "
        "prefill stays eager. Presses that cannot be one graph are refused with the reason.")]
CompileBackend = Annotated[str | None, typer.Option(help="The torch.compile backend of --compile: inductor (the "
        "default: generated code; CUDA graphs on a GPU), or eager / aot_eager (traced only: checks the step is one "
        "graph). Refused without --compile.")]
