from dataclasses import dataclass

from kvbench.presses.wrapper import WrapperPress


@dataclass
class PyramidKVPress(WrapperPress):
    """PyramidKV: shallow layers keep more, deep layers less; the mean over layers is the budget.

    Layer budgets fall linearly from ``(2 - 1/beta) x budget`` at the first layer to ``budget / beta`` at the
    last, rounded so that they add up to exactly ``layers x budget``. The inner press chooses the entries. The
    allocation differs from PyramidKV's code (``tests/reference/test_pyramidkv.py`` measures each): every layer's
    budget includes the inner press's protected tokens, where PyramidKV shares ``budget - window`` and adds its
    window to every layer (so kvbench's deepest layers can keep fewer entries than snapkv-d protects and hold only
    the most recent tokens: at budget 128 over 28 layers the last three keep 25, 16 and 7); the pyramid applies at
    every compression, where PyramidKV's applies only to a cache of at least ``2 x (budget - window)`` entries
    (a long prompt) and is uniform otherwise, so its own rule at a decoding compression is SnapKV's; and PyramidKV
    floors the smallest share and the step, so its layers do not add up to ``layers x budget``.
    """

    name = "pyramidkv"
    summary = "per-layer budgets falling linearly with depth, same total; wraps a scoring press"
    source = "Cai et al. 2024, arXiv 2406.02069"
    reference = "Zefan-Cai/KVCache-Factory@c97f9d7 pyramidkv/pyramidkv_utils.py (PyramidKVCluster.update_kv)"

    #: The last layer keeps 1/beta of the mean budget, the first 2 - 1/beta of it (PyramidKV's beta = 20).
    beta: float = 20.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.beta < 1:
            raise ValueError(f"pyramidkv: beta must be >= 1 (1 = the same budget in every layer), got {self.beta}")

    def layer_budgets(self, budget: int, n_layers: int) -> list[int]:
        if n_layers == 1:
            return [budget]
        low, high = budget / self.beta, budget * (2 - 1 / self.beta)
        weights = [high - (high - low) * i / (n_layers - 1) for i in range(n_layers)]
        return apportion(budget * n_layers, weights)


def apportion(total: int, weights: list[float]) -> list[int]:
    """Integers proportional to ``weights``, each at least 1, summing to ``total`` (largest remainders)."""
    n = len(weights)
    if total < n:
        raise ValueError(f"cannot give {n} layers at least one entry each out of {total}")
    scale = (total - n) / sum(weights)  # one entry each first, the rest in proportion
    exact = [1 + w * scale for w in weights]
    shares = [int(x) for x in exact]
    by_remainder = sorted(range(n), key=lambda i: (shares[i] - exact[i], i))
    for i in by_remainder[: total - sum(shares)]:
        shares[i] += 1
    return shares
