"""The local merge (`merge`): the federated pipeline's arithmetic in one process."""

from tiesfed.engine.local import merge

__all__ = ["merge"]
