"""Feature memories: the NPID memory bank (N rows) and the MoCo FIFO queue (K rows + indices)."""

from sgcl.memory.bank import MemoryBank
from sgcl.memory.queue import FeatureQueue

__all__ = ["MemoryBank", "FeatureQueue"]
