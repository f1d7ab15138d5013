"""FP8 GEMMs with DeepGEMM's fine-grained scaling, and FP8 training layers.

DeepSeek-V3's recipe: activations carry one float32 scale per token per 128
channels (1 x 128, ``jaxinfra.quant.quantize_per_token``), weights one per
128 x 128 block (``quantize_per_block``). The GEMMs accumulate in float32 and
apply the scales once per 128-wide K block (DeepGEMM's two-level
accumulation), the same structure in every implementation:

* :func:`fp8_gemm`: dense ``D = C + A @ B^T``.
* :func:`grouped_fp8_gemm_contiguous`: MoE rows grouped by expert (forward, dgrad).
* :func:`grouped_fp8_gemm_masked`: ``[G, m_max, k]`` with valid rows per group on
  the device (decoding after low-latency dispatch).
* :func:`k_grouped_fp8_gemm`: per-expert K segments (MoE weight gradients).
* :func:`fp8_linear`, :func:`fp8_grouped_linear`, :class:`Fp8Dense`,
  :class:`Fp8GroupedDense`: differentiable layers with FP8 forward, dgrad and wgrad.

Each GEMM has ``impl="xla"`` (pure JAX), ``"ffi"`` (the custom call: CPU
reference loops now, Hopper kernels to come) and ``"auto"``. The custom calls
take their operands in the kernels' layouts, converted in one place
(:mod:`jaxinfra.gemm._layout`: MN-major TMA-aligned per-token scales, K padded
to 16, the 128-aligned contiguous layout of :func:`align_groups`);
``csrc/gemm/gemm.h`` is the kernel-side contract.
"""

from jaxinfra.gemm._layout import (BLOCK_K, BLOCK_N, CONTIGUOUS_ALIGNMENT, GroupLayout,
                                   align_groups, from_mn_major_scales, from_padded, padded_rows,
                                   tma_aligned_size, to_mn_major_scales, to_padded)
from jaxinfra.gemm._ops import (FP8_GEMM, GROUPED_FP8_GEMM_CONTIGUOUS, GROUPED_FP8_GEMM_MASKED,
                                K_GROUPED_FP8_GEMM, fp8_gemm, grouped_fp8_gemm_contiguous,
                                grouped_fp8_gemm_masked, k_grouped_fp8_gemm)
from jaxinfra.gemm._train import (Fp8Dense, Fp8GroupedDense, fp8_grouped_linear, fp8_linear)

__all__ = [
    "BLOCK_K", "BLOCK_N", "CONTIGUOUS_ALIGNMENT", "GroupLayout", "align_groups",
    "from_mn_major_scales", "from_padded", "padded_rows", "tma_aligned_size",
    "to_mn_major_scales", "to_padded", "fp8_gemm", "grouped_fp8_gemm_contiguous",
    "grouped_fp8_gemm_masked", "k_grouped_fp8_gemm", "fp8_linear", "fp8_grouped_linear",
    "Fp8Dense", "Fp8GroupedDense", "FP8_GEMM", "GROUPED_FP8_GEMM_CONTIGUOUS",
    "GROUPED_FP8_GEMM_MASKED", "K_GROUPED_FP8_GEMM",
]
