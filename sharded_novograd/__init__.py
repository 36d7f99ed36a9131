"""sharded-novograd: exact NovoGrad under ZeRO-style sharding."""

from .reference import NovoGrad
from .sharded import ShardedNovoGrad

__version__ = "0.1.0"

__all__ = ["NovoGrad", "ShardedNovoGrad", "__version__"]
