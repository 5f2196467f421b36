"""Measurements the cache reports to after each forward, apart from slots and eviction: observers it calls."""

from __future__ import annotations

import torch


class RetentionRecorder:
    """The share of each sequence's critical prompt positions (numbers, names, option labels) held after every
    forward, per layer, averaged over KV heads: ``log`` [B, layers, forwards], NaN where not measured."""

    def __init__(self, positions: list[list[int]], max_length: int, num_layers: int, max_new_tokens: int, device):
        self.critical = torch.zeros(len(positions), max_length, dtype=torch.bool, device=device)
        for row, row_positions in enumerate(positions):
            self.critical[row, list(row_positions)] = True
        self.log = torch.full((len(positions), num_layers, max_new_tokens), float("nan"), device=device)

    def after_step(self, cache) -> None:
        """After this step's eviction: the critical positions held in ``cache``'s valid slots."""
        if cache.row_step is None and cache.decode_step >= self.log.shape[2]:
            return
        length = self.critical.shape[1]
        n_layers, b, h, _ = cache.valid.shape
        held = torch.zeros(n_layers, b, h, length + 1, dtype=torch.bool, device=self.critical.device)
        held.scatter_(3, torch.where(cache.valid, cache.positions, length).clamp(min=0, max=length), True)
        kept = (held[..., :length] & self.critical[None, :, None, :]).sum(dim=-1).float()
        total = self.critical.sum(dim=-1).float()[None, :, None]
        fraction = (kept / total).mean(dim=-1)  # [L, B]; NaN for a prompt without critical tokens
        if cache.row_step is None:
            self.log[:, :, cache.decode_step] = fraction.T
        else:
            write_at_steps(self.log.transpose(1, 2), cache.row_step, fraction.T)

    def keep_rows(self, index: torch.Tensor) -> None:
        self.critical, self.log = self.critical.index_select(0, index), self.log.index_select(0, index)

    def splice(self, row: int, other: RetentionRecorder) -> None:
        """Row ``row`` takes the critical positions and log of ``other``'s one sequence (continuous batching)."""
        self.critical[row] = False
        self.critical[row, : other.critical.shape[1]] = other.critical[0]
        self.log[row] = other.log[0]


class AttentionLossRecorder:
    """The attention mass each decoding query puts on evicted entries, under full attention over every key seen:
    ``log`` [B, layers, decoding steps, KV heads]. It keeps a shadow of every key at its original position (one
    spare slot absorbs padding writes); each layer writes its keys and records before its eviction."""

    def __init__(self, num_layers: int, max_length: int, max_new_tokens: int):
        self.num_layers, self.max_length, self.max_new_tokens = num_layers, max_length, max_new_tokens
        self.keys: list[torch.Tensor | None] = [None] * num_layers  # [B, H, max_length + 1, D] per layer
        self.written: list[torch.Tensor | None] = [None] * num_layers  # [B, max_length + 1]
        self.log: torch.Tensor | None = None

    def write(self, layer_idx: int, key_states: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor) -> None:
        """A layer's new keys [B, H, L, D] at their positions [B, L] (padding to the spare slot)."""
        b, h, n_new, d = key_states.shape
        if self.keys[layer_idx] is None:
            self._allocate(layer_idx, b, key_states[:, :, :0])
        spare = self.max_length
        index = torch.where(valid, positions, spare)
        self.keys[layer_idx].scatter_(2, index[:, None, :, None].expand(b, h, n_new, d), key_states)
        self.written[layer_idx].scatter_(1, index, True)
        self.written[layer_idx][:, spare] = False

    def _allocate(self, layer_idx: int, b: int, like: torch.Tensor) -> None:
        """Layer ``layer_idx``'s shadow for ``b`` sequences, keys shaped and typed as ``like`` [*, H, *, D]."""
        h, d, device = like.shape[1], like.shape[3], like.device
        self.keys[layer_idx] = torch.zeros(b, h, self.max_length + 1, d, dtype=like.dtype, device=device)
        self.written[layer_idx] = torch.zeros(b, self.max_length + 1, dtype=torch.bool, device=device)
        if self.log is None:
            self.log = torch.zeros(b, self.num_layers, self.max_new_tokens, h, device=device)

    def keep_rows(self, index: torch.Tensor) -> None:
        self.keys = [None if k is None else k.index_select(0, index) for k in self.keys]
        self.written = [None if w is None else w.index_select(0, index) for w in self.written]
        if self.log is not None:
            self.log = self.log.index_select(0, index)

    def splice(self, row: int, other: AttentionLossRecorder, batch: int) -> None:
        """Row ``row`` takes the shadow keys of ``other``'s one sequence, its log cleared (continuous batching)."""
        for i, keys in enumerate(other.keys):
            if keys is None:
                continue
            if self.keys[i] is None:
                self._allocate(i, batch, keys)
            n = other.max_length  # other's positions are below its own length; its spare slot is not copied
            self.keys[i][row] = 0
            self.keys[i][row, :, :n] = keys[0, :, :n]
            self.written[i][row] = False
            self.written[i][row, :n] = other.written[i][0, :n]
        if self.log is not None:
            self.log[row] = 0

    def record(self, layer_idx: int, query: torch.Tensor, scaling: float, held_positions: torch.Tensor,
               held_valid: torch.Tensor, query_position: torch.Tensor, tokens_seen: int,
               decode_step: int | torch.Tensor) -> None:
        """What the query [B, H_q, 1, D] missed: its full attention's mass outside the held slots [B, H, S].
        ``decode_step`` is the forward's, or each row's own [B] (continuous batching)."""
        b, hq, _, d = query.shape
        h = held_positions.shape[1]
        device = query.device
        tokens_seen = min(tokens_seen, self.max_length)  # every position is below the length the shadow holds
        keys = self.keys[layer_idx][:, :, :tokens_seen].float()  # tokens_seen > every position so far
        logits = torch.matmul(query.float().view(b, h, hq // h, d), keys.transpose(-1, -2)) * scaling
        visible = self.written[layer_idx][:, :tokens_seen] & (
            torch.arange(tokens_seen, device=device)[None, :] <= query_position[:, None])
        probs = torch.softmax(logits.masked_fill(~visible[:, None, None, :], -torch.inf), dim=-1)
        held = torch.zeros(b, h, tokens_seen + 1, dtype=torch.bool, device=device)
        held.scatter_(2, torch.where(held_valid, held_positions, tokens_seen).clamp(max=tokens_seen), True)
        missed = (probs * ~held[:, :, None, :tokens_seen]).sum(dim=-1).mean(dim=-1)  # [B, H], GQA group averaged
        if isinstance(decode_step, int):
            self.log[:, layer_idx, decode_step - 1] = missed
        else:
            write_at_steps(self.log[:, layer_idx], decode_step - 1, missed)


def write_at_steps(log: torch.Tensor, steps: torch.Tensor, values: torch.Tensor) -> None:
    """``log[b, ..., steps[b]] = values[b]`` along dimension 1 for the rows whose step lies in the log, without a
    synchronisation (rows out of range rewrite what they hold)."""
    rows = torch.arange(log.shape[0], device=log.device)
    inside = (steps >= 0) & (steps < log.shape[1])
    at = steps.clamp(0, log.shape[1] - 1)
    mask = inside.view(-1, *([1] * (values.dim() - 1)))
    log[rows, at] = torch.where(mask, values, log[rows, at])
