"""Sub-commands of the ``nucsynth`` CLI (see :mod:`nucsynth.cli`)."""
