"""Interoperability with checkpoints of other codebases (docs/interop.md).

* ``safe_pickle``: read a foreign torch checkpoint without importing or executing anything;
* ``keys``: the reference DiT's parameter names <-> udmtrain's ``DiT``;
* ``reference``: read/write the reference (rev_udm) and MDLM-family Lightning layouts and their config;
* ``importer``: write an imported model as a normal udmtrain run directory (through the Checkpointer).
"""
