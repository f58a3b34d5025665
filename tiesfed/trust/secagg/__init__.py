"""Secure aggregation for TIES (Bonawitz et al. 2017): the coordinator learns only the sums.

keys (X25519 pairs signed with the certificate key), prg (HKDF seeds, AES-CTR masks), boxes
(shares sealed pairwise), messages (the plain message dataclasses and their bytes), params
(a round's public parameters), client and server (the two state machines). No transport:
the gRPC service carries `messages.to_bytes` output. The arithmetic is `tiesfed.core.secagg`.
"""

from tiesfed.trust.secagg.client import SecAggClient
from tiesfed.trust.secagg.keys import SecAggError
from tiesfed.trust.secagg.messages import from_bytes, to_bytes
from tiesfed.trust.secagg.params import SecAggRound
from tiesfed.trust.secagg.server import SecAggServer

__all__ = ["SecAggClient", "SecAggError", "SecAggRound", "SecAggServer", "from_bytes", "to_bytes"]
