"""Expert parallelism for JAX: DeepSeek-V3 routing, DeepEP-style dispatch/combine
under ``shard_map`` (normal and low-latency modes, FP8 dispatch, two-level
node/local EP), the local permute custom calls, and the NNX ``MoE`` layer.

See the submodules' docstrings for the contracts:
``routing`` (route, update_bias, sequence_aux_loss), ``layout``
(dispatch_layout), ``permutation`` (permute, unpermute), ``normal`` (dispatch,
combine, cached_dispatch), ``low_latency`` (low_latency_dispatch,
low_latency_combine) and ``layer`` (MoE).
"""

from jaxinfra.moe.normal import (Dispatched, DispatchHandle, cached_dispatch, combine,
                                   dispatch)
from jaxinfra.moe.layer import (MoE, MoEStats, RouterBias, grouped_linear, masked_grouped_linear,
                                physical_expert_weights, replicated_expert_map)
from jaxinfra.moe.layout import dispatch_layout
from jaxinfra.moe.low_latency import (LowLatencyDispatched, LowLatencyHandle,
                                      low_latency_combine, low_latency_dispatch)
from jaxinfra.moe.permutation import Permuted, permute, permute_map, unpermute
from jaxinfra.moe.routing import route, sequence_aux_loss, update_bias

__all__ = [
    "Dispatched", "DispatchHandle", "LowLatencyDispatched", "LowLatencyHandle", "MoE",
    "MoEStats", "Permuted", "RouterBias", "cached_dispatch", "combine", "dispatch",
    "dispatch_layout", "grouped_linear", "low_latency_combine", "low_latency_dispatch",
    "masked_grouped_linear", "permute", "permute_map", "physical_expert_weights",
    "replicated_expert_map", "route",
    "sequence_aux_loss", "unpermute", "update_bias",
]
