import pytest
import torch

from kvstore.pq.synthetic import SyntheticConfig, SyntheticWorkload


def make_clustered(heads: int, n: int, dim: int, *, clusters: int = 16, noise: float = 0.05, seed: int = 0) -> torch.Tensor:
    """``[heads, n, dim]`` keys around ``clusters`` random centres (seeded, never zero)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(heads, clusters, dim, generator=g) * 3
    labels = torch.randint(clusters, (heads, n), generator=g)
    return torch.gather(centres, 1, labels.unsqueeze(-1).expand(heads, n, dim)) + noise * torch.randn(heads, n, dim, generator=g)


@pytest.fixture(scope="session")
def small_layer():
    cfg = SyntheticConfig(num_kv_heads=2, group_size=2, head_dim=64, prompt_len=2048, num_decode=8, num_needles=4, seed=1)
    return cfg, SyntheticWorkload(cfg).layer(0)


@pytest.fixture(scope="session")
def clustered():
    """``clustered(heads, n, dim, clusters=, noise=, seed=)`` -> clustered keys."""
    return make_clustered
