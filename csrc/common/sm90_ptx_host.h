// Host-side helpers of the Hopper kernels (plain C++, no device code): TMA
// tensor maps. Implemented in sm90_tensor_map.cc.
#pragma once

#include <cuda.h>  // CUtensorMap and its enums (types only; the driver is reached at run time)

#include <cstdint>

namespace jaxinfra {
namespace sm90 {

// Encodes a tiled tensor map over `base` (dims[0] innermost, strides_bytes[i]
// the stride of dimension i + 1, rank - 1 of them) with `box` elements per
// dimension; out-of-bounds elements read as zero. Returns nullptr on success,
// else why it failed. Looks cuTensorMapEncodeTiled up once through the runtime
// (no link against libcuda).
const char* encode_tensor_map(CUtensorMap* map, CUtensorMapDataType type, int rank,
                              const void* base, const uint64_t* dims,
                              const uint64_t* strides_bytes, const uint32_t* box,
                              CUtensorMapSwizzle swizzle);

}  // namespace sm90
}  // namespace jaxinfra
