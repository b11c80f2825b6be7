"""Product-quantized key index and decode-time token selection (PQCache-style).

``PQIndex`` (index.py) trains per-head, per-subspace codebooks with batched k-means
(kmeans.py), stores uint8 codes and ranks tokens by ADC (adc.py); ``select_tokens``
(select.py) turns scores into sinks + window + top-k selections; ``PQSequenceIndex``
(sequence.py) keeps one index per layer for a sequence, with drift re-training; metrics.py
measures selections against full attention and synthetic.py generates the workload the tests
and benchmarks share.
"""

from kvstore.pq.adc import adc_scores, adc_topk, lookup_tables
from kvstore.pq.index import PQIndex
from kvstore.pq.kmeans import KMeansConfig, kmeans
from kvstore.pq.select import Budget, Selection, SelectionConfig, resolve_budget, select_tokens, window_selection
from kvstore.pq.sequence import DriftConfig, PQConfig, PQSequenceIndex, select_batch
from kvstore.pq.synthetic import LayerData, SyntheticConfig, SyntheticWorkload

__all__ = [
    "PQIndex", "KMeansConfig", "kmeans", "lookup_tables", "adc_scores", "adc_topk",
    "Budget", "Selection", "SelectionConfig", "resolve_budget", "select_tokens", "window_selection",
    "DriftConfig", "PQConfig", "PQSequenceIndex", "select_batch",
    "LayerData", "SyntheticConfig", "SyntheticWorkload",
]
