"""The Hydra configuration shipped with the package: ``config.yaml`` and the built-in grids, ``grid/*.yaml``.

A package (not only a folder) so that Hydra and :mod:`importlib.resources`
find it wherever the package is installed.
"""
