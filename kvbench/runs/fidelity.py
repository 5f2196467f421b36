"""Teacher-forced fidelity: replay the full cache's response token by token under a press.

Per step: KL(full || compressed) of the next-token distributions, whether the top-1 token agrees, and the
rank of the full cache's token under the press. One forward per token and no sampling: it isolates the error
that compression adds from the model's own reasoning errors, so it ranks presses even on a small model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvbench.presses import for_tokenizer, make_press
from kvbench.runs.session import Session
from kvbench.tasks import Example, Task


@dataclass
class Reference:
    prompt: str
    prompt_ids: list[int]
    output: object  # the full cache's SequenceOutput
    log_probs: list[torch.Tensor]  # per step, [V] float32 on the CPU


def reference(session: Session, task: Task, example: Example, settings,
              compile_backend: str | None = None) -> Reference:
    """The full cache's response under ``settings`` (the run's ``GenerationSettings``) and its next-token
    log-probabilities (cached per session)."""
    from kvbench.engine.generate import generate

    codec = session.codec(task)
    prompt = codec.prompt(example)
    key = (task.name, task.protocol, example.id, prompt, settings)  # the prompt as rendered, whatever its source
    if key not in session.references:
        ids = codec.encode(prompt)
        log_probs: list[torch.Tensor] = []
        (out,) = generate(session.loaded.model, [ids], make_press("full"), None, settings,
                          detokenize=codec.decode, pad_token_id=session.loaded.tokenizer.pad_token_id,
                          on_logits=lambda t, logits: log_probs.append(torch.log_softmax(logits[0].float(), -1).cpu()),
                          compile_backend=compile_backend)
        if len(session.references) >= 64:  # bound memory: drop the oldest reference
            session.references.pop(next(iter(session.references)))
        session.references[key] = Reference(prompt, ids, out, log_probs[: out.output_tokens])
    return session.references[key]


def replay(session: Session, task: Task, ref: Reference, press, budget, settings,
           compile_backend: str | None = None) -> tuple[object, dict]:
    """Teacher-force ``ref``'s tokens under ``press`` at ``budget``; return the output and the fidelity columns."""
    from kvbench.engine.generate import generate

    tokens = ref.output.tokens
    kl, agree, rank = [], [], []

    def compare(t: int, logits: torch.Tensor) -> None:
        if t >= len(tokens):
            return
        log_probs = torch.log_softmax(logits[0].float(), -1).cpu()
        full = ref.log_probs[t]
        kl.append(float((full.exp() * (full - log_probs)).nan_to_num(0.0).sum()))
        agree.append(float(int(log_probs.argmax()) == int(full.argmax())))
        rank.append(float((log_probs > log_probs[tokens[t]]).sum()))

    press = for_tokenizer(press, session.loaded.tokenizer)
    (out,) = generate(session.loaded.model, [ref.prompt_ids], press, budget, settings,
                      detokenize=session.codec(task).decode, pad_token_id=session.loaded.tokenizer.pad_token_id,
                      forced_tokens=[tokens], on_logits=compare, compile_backend=compile_backend)
    steps = max(len(kl), 1)
    return out, {"fidelity_kl_mean": sum(kl) / steps, "fidelity_kl_max": max(kl, default=0.0),
                 "fidelity_top1": sum(agree) / steps, "fidelity_rank_mean": sum(rank) / steps}


def fidelity_columns(session: Session, task: Task, example: Example, press, budget, settings,
                     compile_backend: str | None = None) -> dict:
    """The fidelity columns of ``example`` under ``press`` at ``budget``: its full-cache reference replayed."""
    ref = reference(session, task, example, settings, compile_backend)
    return replay(session, task, ref, press, budget, settings, compile_backend)[1]
