"""Secure aggregation over gRPC (issue 13): the round's public parameters (`settings`), the
coordinator's per-round driver of `SecAggServer` (`session`), publishing the unmasked merge
through the plain round's outputs (`publish`) and the SecureAggregation servicer (`servicer`).

Kept import-free: `rounds.config` imports `settings` from here.
"""
