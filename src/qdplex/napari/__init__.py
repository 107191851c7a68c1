"""qdplex napari plugin (npe2): reader, sample data and widgets; see napari.yaml.

A thin shell over the qdplex Python API; the only part of qdplex that imports
napari, Qt or magicgui. Nothing heavy is imported here: napari loads each
contribution from its own module when it is first used.
"""

__all__: list[str] = []
