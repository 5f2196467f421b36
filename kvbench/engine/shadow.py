"""ShadowCache: ShadowKV's sparse attention over low-rank keys and host-resident values (see the press).

Per layer and sequence, stored by token position: on the device, rank-r coefficients of the pre-RoPE keys
over a basis from the prompt's SVD, one landmark (mean post-RoPE key) per chunk and KV head, the outlier chunks
exact, and the tokens after the last chunk exact (the prompt's tail and every generated token; with
``generated=projected``, a ring of the most recent ones); on the host, every chunked token's values. A decoding step
attends to the outliers, the ring and, per KV head, the chunks whose landmark scores highest for the head's query
group (``chunk_scores``: the group's mean logit, or ShadowKV's maximum over the group of each query head's
softmax), rebuilt: keys from the coefficients with RoPE at their positions, values from the host. The
prefill attends exactly (ShadowKV compresses after the prompt's own attention).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from kvbench.engine.view import StepPlan
from kvbench.errors import KvbenchError
from kvbench.presses.shadowkv import ShadowKVPress

Rope = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # positions [n] -> cos, sin [n, rotary dims]


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Apply (or undo) rotate-half RoPE on the first ``cos.shape[-1]`` dims of ``x`` [..., n, D]."""
    r = cos.shape[-1]
    rot, rest = x[..., :r], x[..., r:]
    half = torch.cat([-rot[..., r // 2:], rot[..., : r // 2]], dim=-1)
    rotated = rot * cos - half * sin if inverse else rot * cos + half * sin
    return torch.cat([rotated, rest], dim=-1)


class ShadowLayer(DynamicLayer):
    def __init__(self, cache: ShadowCache, layer_idx: int):
        super().__init__()
        self.cache = cache
        self.layer_idx = layer_idx
        #: (positions [B, H, T], visible [B, H, T]) of the last decoding step's attention, for tests.
        self.last_attended: tuple[torch.Tensor, torch.Tensor] | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.cache.decode_step > 0:  # the new token joins the ring before it attends
            step = self.cache.step
            slot = (step.positions[:, -1] % self.ring_keys.shape[2])[:, None, None]  # [B, 1, 1]
            ok = step.valid[:, -1][:, None, None, None]
            for ring, new in ((self.ring_keys, key_states), (self.ring_values, value_states)):
                index = slot[..., None].expand(-1, ring.shape[1], 1, ring.shape[-1])
                ring.scatter_(2, index, torch.where(ok, new, ring.gather(2, index)))
            self.ring_positions.scatter_(1, slot[:, 0], torch.where(step.valid[:, -1:], step.positions[:, -1:],
                                                                    self.ring_positions.gather(1, slot[:, 0])))
        return key_states, value_states

    def get_seq_length(self) -> int:
        return self.cache.tokens_seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.cache.tokens_seen, 0

    # --- prefill ---------------------------------------------------------------------------------------------
    def attend_prompt(self, query, keys, values, scaling) -> torch.Tensor:
        """Exact causal attention over the prompt, then the prompt goes into the shadow store."""
        step = self.cache.step
        hq, h = query.shape[1], keys.shape[1]
        mask = step.valid[:, None, None, :] & (step.positions[:, None, None, :] <= step.positions[:, None, :, None])
        out = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scaling,
                                             enable_gqa=hq != h)
        self._store_prompt(keys, values)
        return out.nan_to_num(0.0)

    def _store_prompt(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        cache, press = self.cache, self.cache.press
        b, h, width, d = keys.shape
        c, length = press.chunk_size, cache.max_length
        device = keys.device
        lengths = cache.lengths  # host, per row
        # Left padding: position p of row b sits at column width - n_b + p.
        shift = torch.tensor([width - n for n in lengths], device=device)
        columns = (torch.arange(width, device=device)[None, :] + shift[:, None]).clamp(max=width - 1)  # [B, width]
        by_position = keys.gather(2, columns[:, None, :, None].expand(b, h, width, d)).float()
        values_by_position = values.gather(2, columns[:, None, :, None].expand(b, h, width, d))
        cos, sin = cache.rope_table(width)
        pre_rope = rotate(by_position, cos, sin, inverse=True)  # [B, H, width, D]
        rank = min(press.rank, h * d)
        self.basis = keys.new_zeros(b, rank, h * d, dtype=torch.float32)
        self.coefficients = keys.new_zeros(b, length, rank, dtype=torch.float32)
        for row, n in enumerate(lengths):
            flat = pre_rope[row, :, :n].transpose(0, 1).reshape(n, h * d)
            # A complete orthonormal basis: a rank above the prompt's still reconstructs every key exactly.
            basis = torch.linalg.svd(flat, full_matrices=True).Vh[:rank]
            self.basis[row] = basis
            self.coefficients[row, :n] = flat @ basis.T
        pin = device.type == "cuda"
        self.host_values = torch.zeros(b, h, length, d, dtype=values.dtype, pin_memory=pin)
        self.host_values[:, :, :width] = values_by_position.cpu()
        n_chunks = length // c
        self.landmarks = keys.new_zeros(b, h, n_chunks, d, dtype=torch.float32)
        self.chunk_valid = torch.zeros(b, h, n_chunks, dtype=torch.bool, device=device)
        # The ring: the tokens after the last full chunk, exact; with generated tokens exact, every one of them.
        ring = press.local_window + c if press.generated == "projected" else length
        self.ring_keys = keys.new_zeros(b, h, ring, d)
        self.ring_values = values.new_zeros(b, h, ring, d)
        self.ring_positions = torch.full((b, ring), -1, dtype=torch.long, device=device)
        outliers = press.outlier_chunks * c
        self.outlier_keys = keys.new_zeros(b, h, outliers, d)
        self.outlier_values = values.new_zeros(b, h, outliers, d)
        self.outlier_positions = torch.full((b, h, outliers), -1, dtype=torch.long, device=device)
        for row, n in enumerate(lengths):
            end = cache.chunk_end[row]
            if end:
                chunks = by_position[row, :, :end].view(h, end // c, c, d)
                landmarks = chunks.mean(dim=2)
                self.landmarks[row, :, : end // c] = landmarks
                self.chunk_valid[row, :, : end // c] = True
                self._mark_outliers(row, chunks, landmarks, by_position[row], values_by_position[row])
            tail = torch.arange(end, n, device=device)
            self.ring_keys[row, :, tail % ring] = by_position[row, :, end:n].to(keys.dtype)
            self.ring_values[row, :, tail % ring] = values_by_position[row, :, end:n]
            self.ring_positions[row, tail % ring] = tail

    def _mark_outliers(self, row, chunks, landmarks, keys, values) -> None:
        """The chunks whose least similar key is least similar to the landmark stay exact, per KV head."""
        n_out = min(self.cache.press.outlier_chunks, chunks.shape[1])
        if n_out == 0:
            return
        c = self.cache.press.chunk_size
        similarity = F.cosine_similarity(chunks, landmarks[:, :, None, :], dim=-1).amin(dim=-1)  # [H, chunks]
        worst = similarity.topk(n_out, dim=-1, largest=False).indices  # [H, n_out]
        self.chunk_valid[row].scatter_(1, worst, False)  # attended as outliers, never selected
        tokens = (worst[..., None] * c + torch.arange(c, device=worst.device)).flatten(1)  # [H, n_out * c]
        index = tokens[..., None].expand(-1, -1, keys.shape[-1])
        self.outlier_keys[row, :, : n_out * c] = keys.gather(1, index).to(self.outlier_keys.dtype)
        self.outlier_values[row, :, : n_out * c] = values.gather(1, index)
        self.outlier_positions[row, :, : n_out * c] = tokens

    # --- decoding --------------------------------------------------------------------------------------------
    def attend(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling: float) -> torch.Tensor:
        """Exact attention over the prompt at the prefill, then sparse attention (``attend_sparse``)."""
        if self.cache.decode_step == 0:
            return self.attend_prompt(query, keys, values, scaling)
        return self.attend_sparse(query, scaling)

    def attend_sparse(self, query: torch.Tensor, scaling: float) -> torch.Tensor:
        """One query per sequence over outliers + selected chunks (rebuilt) + the ring."""
        cache, press = self.cache, self.cache.press
        b, hq, _, d = query.shape
        h = self.ring_keys.shape[1]
        group = hq // h
        c = press.chunk_size
        q = query.view(b, h, group, d)
        # Chunk scores; only full, non-outlier chunks compete.
        logits = torch.matmul(q.float(), self.landmarks.transpose(-1, -2))  # [B, H, group, chunks]
        if press.chunk_scores == "softmax-max":  # ShadowKV: each query head's softmax (/ sqrt(128)), the group's max
            logits = logits.div_(math.sqrt(128)).masked_fill_(~self.chunk_valid[:, :, None], -torch.inf)
            scores = torch.softmax(logits, dim=-1).amax(dim=2)
        else:  # the group's mean logit
            scores = logits.mean(dim=2)
        scores = scores.masked_fill(~self.chunk_valid, -torch.inf)  # [B, H, chunks]
        k = min(cache.selected_chunks, scores.shape[-1])
        top = scores.topk(k, dim=-1)
        # Each sequence rebuilds what its budget leaves after its ring and outliers (all chunks if it covers all).
        within = torch.arange(k, device=q.device) < cache.chunks_allowed()[:, None, None]
        chosen_ok = ((top.values > -torch.inf) & within).repeat_interleave(c, dim=-1)  # [B, H, k * c]
        tokens = (top.indices[..., None] * c + torch.arange(c, device=q.device)).flatten(2)  # [B, H, k * c]
        keys = self._rebuild_keys(tokens).to(query.dtype)
        host_index = tokens.cpu()
        values = self.host_values.gather(2, host_index[..., None].expand(-1, -1, -1, d)).to(query.device,
                                                                                              non_blocking=True)
        ring_ok = (self.ring_positions >= 0)[:, None, :].expand(b, h, -1)
        all_keys = torch.cat([self.outlier_keys, keys, self.ring_keys], dim=2)
        all_values = torch.cat([self.outlier_values, values, self.ring_values], dim=2)
        visible = torch.cat([self.outlier_positions >= 0, chosen_ok, ring_ok], dim=2)
        self.last_attended = (torch.cat([self.outlier_positions, tokens,
                                         self.ring_positions[:, None, :].expand(b, h, -1)], dim=2), visible)
        out = F.scaled_dot_product_attention(q, all_keys, all_values, attn_mask=visible[:, :, None, :], scale=scaling)
        return out.view(b, hq, 1, d)

    def _rebuild_keys(self, tokens: torch.Tensor) -> torch.Tensor:
        """Post-RoPE keys [B, H, n, D] of chunked tokens: coefficients x basis, rotated at their positions."""
        b, h, n = tokens.shape
        rank, d = self.basis.shape[1], self.ring_keys.shape[-1]
        coefficients = self.coefficients.gather(1, tokens.reshape(b, h * n, 1).expand(-1, -1, rank)).view(b, h, n, rank)
        basis = self.basis.view(b, rank, h, d).transpose(1, 2)  # [B, H, r, D]
        cos, sin = self.cache.rope_table(self.cache.max_length)
        return rotate(torch.matmul(coefficients, basis), cos[tokens], sin[tokens])

    def chunk_tokens(self, row: int, start: int) -> None:
        """Move tokens [start, start + chunk) of sequence ``row`` from the ring into the shadow store."""
        c = self.cache.press.chunk_size
        ring = self.ring_keys.shape[2]
        positions = torch.arange(start, start + c, device=self.ring_keys.device)
        slots = positions % ring
        keys = self.ring_keys[row][:, slots].float()  # [H, c, D]
        h, _, d = keys.shape
        cos, sin = self.cache.rope_table(self.cache.max_length)
        pre_rope = rotate(keys, cos[positions], sin[positions], inverse=True)
        self.coefficients[row, start:start + c] = pre_rope.transpose(0, 1).reshape(c, h * d) @ self.basis[row].T
        self.host_values[row, :, start:start + c] = self.ring_values[row][:, slots].cpu()
        self.landmarks[row, :, start // c] = keys.mean(dim=1)
        self.chunk_valid[row, :, start // c] = True
        self.ring_positions[row, slots] = -1


class ShadowCache(DynamicCache):
    """The cache for ``ShadowKVPress``: the step protocol and telemetry of ``BudgetCache``, sparse attention."""

    def __init__(self, press: ShadowKVPress, budget: int, num_layers: int, max_length: int, rope: Rope,
                 batch: int):
        self.press = press
        self.budget = budget
        press.cadence(budget)  # fails on a budget below the fixed part
        #: The most chunks a step may rebuild: a budget above the length covers every chunk.
        self.selected_chunks = budget // press.chunk_size
        self.max_length = max_length
        self.rope = rope
        self._rope_table: tuple[torch.Tensor, torch.Tensor] | None = None
        self.lengths = [0] * batch  # tokens seen per sequence (host)
        self.outlier_tokens = [0] * batch
        self._allowed: dict[tuple[int, ...], torch.Tensor] = {}
        self.chunk_end = [0] * batch  # tokens [0, chunk_end) are chunked, per sequence
        self.peak = [0] * batch
        self.host_peak = [0] * batch
        self.step: StepPlan | None = None
        self.tokens_seen = 0
        self.query_position: torch.Tensor | None = None
        # Telemetry that BudgetCache offers and ShadowKV does not measure.
        self.loss_log = self.retention_log = None
        Cache.__init__(self, layers=[ShadowLayer(self, i) for i in range(num_layers)])

    def rope_table(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 cos, sin [length, rotary dims] for positions 0..length-1 (computed once, at max_length)."""
        if self._rope_table is None:
            self._rope_table = self.rope(torch.arange(self.max_length))
        cos, sin = self._rope_table
        return cos[:length], sin[:length]

    def _row_allowed(self, row: int) -> int:
        """Chunks sequence ``row`` may rebuild this step: its budget less its exact tokens (the prompt's, where
        generated tokens are exact on top) and outliers."""
        exact = (self.lengths if self.press.generated == "projected" else self.prompt_lengths)[row]
        return (self.budget - (exact - self.chunk_end[row]) - self.outlier_tokens[row]) // self.press.chunk_size

    def chunks_allowed(self) -> torch.Tensor:
        """[B] ``_row_allowed`` of every sequence, on the device (each distinct tuple crosses once)."""
        allowed = tuple(self._row_allowed(row) for row in range(len(self.lengths)))
        if allowed not in self._allowed:
            self._allowed = {allowed: torch.tensor(allowed, device=self.query_position.device)}
        return self._allowed[allowed]

    def begin_step(self, positions, valid, valid_counts, decode_step: int = 0, token_ids=None) -> StepPlan:
        if decode_step == 0 and positions.shape[1] > 1 and self.tokens_seen:
            raise KvbenchError("shadowkv: one prefill per generation")
        self.step = StepPlan(positions=positions, valid=valid, valid_counts=valid_counts, decode_step=decode_step)
        self.query_position = positions[:, -1]
        self.tokens_seen += positions.shape[1]
        for row, n in enumerate(valid_counts):
            self.lengths[row] += n
        if decode_step == 0:
            self.prompt_lengths = list(self.lengths)
            c, window = self.press.chunk_size, self.press.local_window
            self.chunk_end = [max(0, (n - window) // c * c) for n in self.lengths]
            self.outlier_tokens = [min(self.press.outlier_chunks, end // c) * c for end in self.chunk_end]
        return self.step

    @property
    def decode_step(self) -> int:
        return self.step.decode_step if self.step is not None else 0

    def end_step(self) -> None:
        """Tokens leaving the local window join the chunks; then the bookkeeping."""
        c, window = self.press.chunk_size, self.press.local_window
        projected = self.press.generated == "projected"
        for row, n in enumerate(self.lengths):
            if projected and self.decode_step > 0 and n - self.chunk_end[row] >= window + c:
                for layer in self.layers:
                    layer.chunk_tokens(row, self.chunk_end[row])
                self.chunk_end[row] += c
            device, host = self._bytes(row)
            self.peak[row] = max(self.peak[row], device)
            self.host_peak[row] = max(self.host_peak[row], host)

    # --- telemetry ----------------------------------------------------------------------------------------------
    def _bytes(self, row: int) -> tuple[int, int]:
        """(device, host) KV bytes of sequence ``row`` now: what ShadowKV stores, not the preallocation."""
        layer = self.layers[0]
        if not hasattr(layer, "basis"):
            return 0, 0
        _, rank, flat = layer.basis.shape  # flat = KV heads x head dim
        chunked = self.chunk_end[row]
        exact = self.lengths[row] - chunked + self.outlier_tokens[row]  # ring + outliers, keys and values
        device = (4 * (rank * flat + chunked * rank + chunked // self.press.chunk_size * flat)
                  + layer.ring_keys.element_size() * 2 * flat * exact)
        host = layer.host_values.element_size() * flat * chunked
        return device * len(self.layers), host * len(self.layers)

    def bytes_per_entry(self) -> int:
        layer = self.layers[0]
        if not layer.is_initialized or not hasattr(layer, "ring_keys"):
            return 0
        _, h, _, d = layer.ring_keys.shape
        return len(self.layers) * h * 2 * d * layer.ring_keys.element_size()

    def entries(self, row: int) -> int:
        """Tokens attended per KV head at the last step (at most the budget)."""
        out, ring = self.outlier_tokens[row], self.lengths[row] - self.chunk_end[row]
        selectable = self.chunk_end[row] - out
        return out + min(selectable, self._row_allowed(row) * self.press.chunk_size) + ring

    def peak_bytes(self, row: int) -> int:
        return self.peak[row]

    def host_bytes(self, row: int) -> int:
        return self.host_peak[row]

    def evicted_tokens(self, row: int) -> int:
        return 0

    def track_critical(self, *args, **kwargs) -> None:
        raise KvbenchError("shadowkv evicts nothing: --measure retention does not apply")
