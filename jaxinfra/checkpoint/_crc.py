"""CRC-32C (Castagnoli) of buffers, and combining CRCs of adjacent pieces.

The bytes are hashed by the ``crc32c`` package (SSE4.2 / ARMv8 instructions,
any buffer-protocol object without a copy, the GIL released for large
buffers). ``combine`` is the standard GF(2) matrix method (as zlib's
``crc32_combine``) for the reflected Castagnoli polynomial: the CRC of ``a + b``
from ``crc(a)``, ``crc(b)`` and ``len(b)``, so a shard's CRC comes from its
blocks' CRCs without hashing the bytes twice.
"""

from __future__ import annotations

import functools

import crc32c as _crc32c

_POLY = 0x82F63B78  # reflected 0x1EDC6F41


def crc32c(data, value: int = 0) -> int:
  """CRC-32C of ``data`` (any contiguous buffer), continuing from ``value``."""
  return _crc32c.crc32c(data, value)


def _times(matrix: list[int], vector: int) -> int:
  out, i = 0, 0
  while vector:
    if vector & 1:
      out ^= matrix[i]
    vector >>= 1
    i += 1
  return out


def _square(matrix: list[int]) -> list[int]:
  return [_times(matrix, matrix[n]) for n in range(32)]


@functools.lru_cache(maxsize=64)
def _zeros_operator(length: int) -> tuple[int, ...]:
  """The 32x32 GF(2) operator that appends ``length`` zero bytes to a CRC state."""
  result = [1 << n for n in range(32)]           # identity
  power = [_POLY] + [1 << n for n in range(31)]  # one zero bit
  for _ in range(3):
    power = _square(power)                       # one zero byte
  while length:
    if length & 1:
      result = [_times(power, column) for column in result]
    length >>= 1
    if length:
      power = _square(power)
  return tuple(result)


def combine(crc_a: int, crc_b: int, length_b: int) -> int:
  """CRC-32C of ``a + b`` given ``crc32c(a)``, ``crc32c(b)`` and ``len(b)``."""
  if length_b <= 0:
    return crc_a
  return _times(list(_zeros_operator(length_b)), crc_a) ^ crc_b


def combine_blocks(crcs: list[int], length: int, block: int) -> int:
  """CRC-32C of a buffer of ``length`` bytes from the CRCs of its ``block``-byte pieces."""
  total = 0
  for i, crc in enumerate(crcs):
    piece = min(block, length - i * block)
    total = crc if i == 0 else combine(total, crc, piece)
  return total
