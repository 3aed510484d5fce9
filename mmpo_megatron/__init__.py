"""mmpo-megatron: MMPO (and DPO, IPO, SimPO) preference training on megatron-core."""

__version__ = "0.1.0"
