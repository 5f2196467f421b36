"""What a ``BudgetCache`` reports about itself: entries held, bytes, evictions, kept positions (host side, no
synchronisation, except ``kept_positions``), and the measurements told after every forward (retention)."""

from __future__ import annotations

import torch

from kvbench.engine.recorders import RetentionRecorder


def entry_bytes(num_layers: int, num_kv_heads: int, key_dim: int, value_dim: int, element_size: int) -> int:
    """Bytes of one token's keys and values across all layers and KV heads."""
    return num_layers * num_kv_heads * (key_dim + value_dim) * element_size


class CacheTelemetry:
    """Mixed into ``BudgetCache``: reads its occupancy and buffers, changes nothing but its observers."""

    # --- measurement --------------------------------------------------------------------------------------------
    def track_critical(self, positions: list[list[int]], max_new_tokens: int, device) -> None:
        """Measure retention of these prompt positions (per sequence) after every forward."""
        self.retention = RetentionRecorder(positions, self.max_length, len(self.layers), max_new_tokens, device)
        self.observers.append(self.retention)

    @property
    def retention_log(self) -> torch.Tensor | None:
        return None if self.retention is None else self.retention.log

    @property
    def loss_log(self) -> torch.Tensor | None:
        return None if self.attention_loss is None else self.attention_loss.log

    # --- telemetry (host side, no synchronisation) ------------------------------------------------------------
    def entries(self, row: int) -> float:
        """Valid entries per KV head held for sequence ``row``, averaged over layers."""
        return self.occupancy.entries(row)

    def bytes_per_entry(self) -> int:
        """Bytes of one token's keys and values across all layers and KV heads."""
        if self.keys is None:
            return 0
        n_layers, _, h, _, d = self.keys.shape
        return entry_bytes(n_layers, h, d, self.values.shape[-1], self.keys.element_size())

    def peak_bytes(self, row: int) -> int:
        return self.occupancy.peak[row] * self.bytes_per_entry() // len(self.layers)

    def host_bytes(self, row: int) -> int:
        return 0  # nothing is offloaded to host memory

    def evicted_tokens(self, row: int) -> float:
        """Entries evicted per KV head for sequence ``row``, averaged over layers."""
        return self.occupancy.evicted[row] / len(self.layers)

    def kept_positions(self, row: int = 0) -> list[list[set[int]]]:
        """Per layer, per KV head, the positions currently held (for tests and analysis; synchronises)."""
        out = []
        for layer in self.layers:
            pos, ok = layer.positions[row].tolist(), layer.valid[row].tolist()
            out.append([{p for p, v in zip(ph, vh) if v} for ph, vh in zip(pos, ok)])
        return out
