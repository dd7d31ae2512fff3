"""Pretraining methods (SGCL, MoCo v2, SimCLR) behind one interface (see ``base.py``)."""

from sgcl.methods.config import MethodConfig, MoCoConfig, SGCLConfig, SimCLRConfig
from sgcl.methods.factory import available_methods, build_method

__all__ = ["MethodConfig", "SGCLConfig", "MoCoConfig", "SimCLRConfig", "build_method", "available_methods"]
