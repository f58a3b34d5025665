"""Versioned gRPC packages of tiesfed (see v1)."""
