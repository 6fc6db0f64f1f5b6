"""Model families (semantic SDM/NASDM/DiffMix, structure, joint) behind one interface.

See :mod:`nucsynth.models.base`; :func:`get_family` finds a family by the name stored in a
checkpoint.
"""

from nucsynth.models.base import ModelFamily, family_names, get_family, register_family

__all__ = ["ModelFamily", "family_names", "get_family", "register_family"]
