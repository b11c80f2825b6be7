"""A seeded synthetic long-context workload: per-layer K, V and decode queries that look like a
real model's, for the tests and benchmarks of token selection (and the long-context benchmark).

Generative model, per layer (seed = (config.seed, layer)) and KV head h, all in "pre-RoPE"
content space unless said otherwise:

* **Text as topics.** Positions are cut into segments of geometric length (mean
  ``segment_len``); each segment has one topic drawn from a Zipf(``zipf``) law over
  ``num_topics`` topics, shared by all heads (it is the text). Head h has one vector per topic,
  built from a decaying spectrum with ``low_freq_energy`` of its energy on the lowest-frequency
  RoPE channel pairs (the channels real models use for long-range, position-free matching).
* **Keys** ``k_t = RoPE(mu_h + a_ht * topic_h[z_t] + noise_scale * eps_t, t)``: ``a_ht`` is the
  token's salience, lognormal with mean 1 and log-std ``salience`` (content words carry their
  topic strongly, function words weakly), so attention concentrates on a few tokens of each
  relevant topic as in real models, where a handful to a hundred keys hold most of a head's
  mass; with ``salience=0`` every token of a topic scores alike and attention is far more
  diffuse (exact top-1/16 then holds ~0.89 of the mass at 32K, against ~0.98 by default). ``mu_h`` holds
  ``num_outlier_channels`` high-magnitude channels (``outlier_scale`` x the typical channel),
  which RoPE spreads on circles for the faster-rotating pairs, as in real K.
* **Attention sinks.** The first ``num_sinks`` tokens carry a large sink vector instead; every
  query has a component along the sinks' rotated keys worth ``sink_logit`` logits.
* **Locality** follows from RoPE: the query matches its current topic on every channel, so
  tokens of the current segment (recent) also agree on the high-frequency channels that
  decorrelate with distance.
* **Decode queries** (``num_decode`` steps at positions ``prompt_len + s``): per KV head a group
  query mixing the current topic with ``recall_topics`` topics seen earlier (weights
  ``topic_logit`` then decaying), rotated by RoPE to its position, plus the sink term; the
  ``group_size`` query heads of a group are the group query plus ``head_noise`` independent
  noise (GQA heads agree mostly, not fully).
* **Needles.** ``num_needles`` positions spread over the prompt hold keys of random directions;
  decode step ``needle_steps[i]`` adds ``needle_logit`` logits of exact match with needle i (all
  heads), the pattern of a retrieval question.
* **Values** ``v_t = nu_h + topic value + noise``: a shared mean, as real V has.
* **Drift** (``drift_at``): from that position on, keys (and queries) use a second set of
  head means, outlier channels and topic vectors: a codebook trained before it fits badly.

Scales: key channels have std ~1, logits are ``q.k / sqrt(head_dim)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kvstore.errors import ConfigError

__all__ = ["SyntheticConfig", "LayerData", "SyntheticWorkload", "rope"]


@dataclass(frozen=True, kw_only=True)
class SyntheticConfig:
    """Knobs of the generative model (see the module docstring); defaults are Llama-3-8B-like."""

    num_kv_heads: int = 8
    group_size: int = 4
    head_dim: int = 128
    prompt_len: int = 32768
    num_decode: int = 32
    rope_theta: float = 500000.0
    num_topics: int = 256
    segment_len: int = 48
    zipf: float = 0.8
    low_freq_energy: float = 0.7
    noise_scale: float = 0.2
    salience: float = 0.25
    num_outlier_channels: int = 4
    outlier_scale: float = 6.0
    num_sinks: int = 4
    sink_logit: float = 14.0
    topic_logit: float = 10.0
    recall_topics: int = 3
    head_noise: float = 0.15
    num_needles: int = 8
    needle_logit: float = 18.0
    drift_at: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("num_kv_heads", "group_size", "head_dim", "prompt_len", "num_decode", "num_topics", "segment_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"SyntheticConfig.{name} must be a positive int, got {value!r}")
        if self.head_dim % 2:
            raise ConfigError(f"SyntheticConfig.head_dim must be even (RoPE pairs), got {self.head_dim}")
        for name in ("num_outlier_channels", "num_sinks", "recall_topics", "num_needles"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"SyntheticConfig.{name} must be an int >= 0, got {value!r}")
        if self.num_outlier_channels > self.head_dim:
            raise ConfigError(f"SyntheticConfig.num_outlier_channels={self.num_outlier_channels} > head_dim={self.head_dim}")
        if not 0.0 <= self.low_freq_energy <= 1.0:
            raise ConfigError(f"SyntheticConfig.low_freq_energy must be in [0, 1], got {self.low_freq_energy}")
        if self.num_needles > self.num_decode:
            raise ConfigError(f"SyntheticConfig.num_needles={self.num_needles} > num_decode={self.num_decode} steps to ask for them")
        if self.num_sinks + 2 * self.num_needles >= self.prompt_len:
            raise ConfigError(f"SyntheticConfig.prompt_len={self.prompt_len} is too short for the sinks and needles")
        if self.drift_at is not None and not 0 < self.drift_at < self.total_tokens:
            raise ConfigError(f"SyntheticConfig.drift_at={self.drift_at} must be in (0, {self.total_tokens})")

    @property
    def num_q_heads(self) -> int:
        return self.num_kv_heads * self.group_size

    @property
    def total_tokens(self) -> int:
        """Prompt plus the decode tokens (decode step s appends the token at ``prompt_len + s``)."""
        return self.prompt_len + self.num_decode

    @property
    def softmax_scale(self) -> float:
        return 1.0 / math.sqrt(self.head_dim)


@dataclass(frozen=True)
class LayerData:
    """One layer of the workload.

    Attributes:
        keys: ``[Hkv, T, D]`` post-RoPE keys, ``T = prompt_len + num_decode``.
        values: ``[Hkv, T, D]``.
        queries: ``[S, Hq, D]`` post-RoPE decode queries; query ``s`` sits at position
            ``query_positions[s]`` and attends to ``keys[:, :query_positions[s] + 1]``.
        query_positions: ``[S]`` int64, ``prompt_len + s``.
        needle_positions: ``[num_needles]`` int64 token positions of the planted needles.
        needle_steps: ``[num_needles]`` int64 decode step whose query asks for each needle.
    """

    keys: torch.Tensor
    values: torch.Tensor
    queries: torch.Tensor
    query_positions: torch.Tensor
    needle_positions: torch.Tensor
    needle_steps: torch.Tensor


def rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary embedding, rotate-half convention (channel i pairs with i + D/2, as HF Llama).

    Args:
        x: ``[..., T, D]``; positions: ``[T]``.
    """
    D = x.shape[-1]
    inv_freq = theta ** (-torch.arange(0, D // 2, dtype=torch.float64) * 2.0 / D)
    angles = positions.to(torch.float64)[:, None] * inv_freq[None, :]  # [T, D/2]
    cos = torch.cat([angles.cos(), angles.cos()], -1).to(x.dtype)
    sin = torch.cat([angles.sin(), angles.sin()], -1).to(x.dtype)
    half = D // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * cos + rotated * sin


class SyntheticWorkload:
    """Deterministic generator of ``LayerData``: ``SyntheticWorkload(config).layer(l)``."""

    def __init__(self, config: SyntheticConfig | None = None) -> None:
        self.config = config or SyntheticConfig()

    def layer(self, layer: int) -> LayerData:
        c = self.config
        g = torch.Generator().manual_seed(c.seed * 1_000_003 + layer)
        H, D, T, P, S = c.num_kv_heads, c.head_dim, c.total_tokens, c.prompt_len, c.num_decode

        def randn(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, generator=g)

        # -- the text: segments of topics, shared by heads
        lengths = torch.empty(T).geometric_(1.0 / c.segment_len, generator=g).long()
        starts = torch.cumsum(lengths, 0)
        segment = torch.searchsorted(starts, torch.arange(T), right=True)  # [T] segment id
        zipf = 1.0 / torch.arange(1, c.num_topics + 1, dtype=torch.float64) ** c.zipf
        seg_topic = torch.multinomial(zipf, int(segment[-1]) + 1, replacement=True, generator=g)
        topic = seg_topic[segment]  # [T]

        # -- channel weights: low-frequency RoPE pairs (the last D/8 of each half) get low_freq_energy
        low = torch.zeros(D, dtype=torch.bool)
        n_low = max(1, D // 8)
        low[D // 2 - n_low : D // 2] = True
        low[D - n_low :] = True
        weight = torch.where(low, c.low_freq_energy / low.sum(), (1 - c.low_freq_energy) / (~low).sum()).sqrt() * math.sqrt(D)

        def regime() -> tuple[torch.Tensor, torch.Tensor]:
            """Head means (with outlier channels) and topic vectors of one key distribution."""
            mu = 0.3 * randn(H, D)
            for h in range(H):
                ch = torch.randperm(D, generator=g)[: c.num_outlier_channels]
                mu[h, ch] = c.outlier_scale * torch.sign(randn(len(ch)))
            spectrum = 1.0 / torch.arange(1, D + 1).float().sqrt()
            basis = torch.linalg.qr(randn(H, D, D))[0]  # [H, D, D] random orthonormal
            topics = torch.einsum("tr,hdr->htd", randn(c.num_topics, D) * spectrum, basis) * weight
            topics = topics / topics.norm(dim=-1, keepdim=True) * math.sqrt(D)
            return mu, topics

        mu, topics = regime()
        salience = torch.exp(c.salience * randn(H, T, 1) - c.salience**2 / 2)  # lognormal, mean 1
        content = mu[:, None, :] + salience * topics[:, topic] + c.noise_scale * randn(H, T, D)
        drift = c.drift_at if c.drift_at is not None else T
        if c.drift_at is not None:
            mu2, topics2 = regime()
            content[:, drift:] = mu2[:, None, :] + topics2[:, topic[drift:]] + c.noise_scale * randn(H, T - drift, D)

        sink = (weight * randn(H, D)) * 1.5  # large-norm, low-frequency-heavy
        content[:, : c.num_sinks] = sink[:, None, :]
        needle_positions = torch.linspace(c.num_sinks + P // 16, P - P // 16, c.num_needles).long()
        needles = randn(H, c.num_needles, D) * weight
        content[:, needle_positions] = needles
        positions = torch.arange(T)
        keys = rope(content, positions, c.rope_theta)

        # -- values: shared mean + per-topic component + noise
        values = randn(H, 1, D) + 0.5 * randn(H, c.num_topics, D)[:, topic] + randn(H, T, D)

        # -- decode queries
        query_positions = torch.arange(P, T)
        needle_steps = torch.linspace(0, S - 1, c.num_needles).long() if c.num_needles else torch.zeros(0, dtype=torch.long)
        unit = lambda v: v / v.norm(dim=-1, keepdim=True)  # noqa: E731
        scale = math.sqrt(D)  # logit = q.k / sqrt(D): a unit-norm key direction times this gives 1 logit per |k|
        queries = torch.empty(S, H * c.group_size, D)
        sink_dir = unit(keys[:, : max(1, c.num_sinks)].mean(1))  # [H, D]
        sink_norm = keys[:, : max(1, c.num_sinks)].norm(dim=-1).mean(1, keepdim=True)
        for s in range(S):  # S decode steps (tens), vectorised over heads
            t = int(query_positions[s])
            reg_topics = topics2 if t >= drift else topics
            seen = topic[:t]
            recalled = seen[torch.randint(len(seen), (c.recall_topics,), generator=g)]
            mix = [(int(topic[t]), 1.0)] + [(int(z), 0.8 ** (i + 1)) for i, z in enumerate(recalled)]
            q_content = sum(w * unit(reg_topics[:, z]) for z, w in mix)  # [H, D]
            q = rope(c.topic_logit * q_content[:, None, :], torch.tensor([t]), c.rope_theta)[:, 0]  # topics have norm sqrt(D)
            if c.num_sinks:
                q = q + sink_dir * (c.sink_logit * scale / sink_norm)
            hit = (needle_steps == s).nonzero().flatten()
            for i in hit.tolist():
                kn = keys[:, int(needle_positions[i])]
                q = q + unit(kn) * (c.needle_logit * scale / kn.norm(dim=-1, keepdim=True))
            group = q.repeat_interleave(c.group_size, 0)
            queries[s] = group + c.head_noise * q.norm(dim=-1, keepdim=True).repeat_interleave(c.group_size, 0) * unit(
                randn(H * c.group_size, D)
            )
        return LayerData(
            keys=keys.contiguous(),
            values=values.contiguous(),
            queries=queries,
            query_positions=query_positions,
            needle_positions=needle_positions,
            needle_steps=needle_steps,
        )
