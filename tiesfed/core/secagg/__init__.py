"""Secure aggregation's arithmetic, without crypto: fixed-point lanes in Z_{2^b}, the union
support, decoding ring sums back into an `Accumulator`, and Shamir sharing over a prime field.

The masks, keys and the protocol live in `tiesfed.trust.secagg`; everything here is pure
(tensors and integers in, tensors and integers out), so the decoded sums go through the same
`finalize` as the local and federated merges.
"""

from tiesfed.core.secagg.decode import decode_sums, secure_finalize
from tiesfed.core.secagg.encode import encode_lanes, quantise, quantise_weight
from tiesfed.core.secagg.ring import FixedPoint, RingError, RingLayout, ring_add, ring_sub
from tiesfed.core.secagg.shamir import PRIME, ShamirError, combine, split
from tiesfed.core.secagg.support import pack_support, release_support, union_support, unpack_support

__all__ = [
    "PRIME", "FixedPoint", "RingError", "RingLayout", "ShamirError", "combine", "decode_sums", "encode_lanes",
    "pack_support", "quantise", "release_support", "quantise_weight", "ring_add", "ring_sub", "secure_finalize", "split",
    "union_support", "unpack_support",
]
