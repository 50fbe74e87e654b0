"""Merge methods: one module per family of methods, each declaring on its `family`
(family.py) its builtins, its node ops' lowerings and renderings; their primitives are
in `ops/`. `registry.py` lists the families.
"""
