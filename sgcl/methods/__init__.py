"""Pretraining methods (SGCL, MoCo v2, SimCLR) behind one interface (see ``base.py``)."""
