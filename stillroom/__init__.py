"""stillroom: run the teacher once per augmentation seed, store its labels, train many students from the store.

The installed packages are ``stillroom.pipelines`` (the stages: core, data, views, teachers, store, labeling,
training), ``stillroom.student`` and ``stillroom.services``; this module is the small public API on top.
Importing it is cheap: it imports neither torch nor Ray until a name is used.
"""

from __future__ import annotations

from importlib import metadata

try:
    __version__ = metadata.version("stillroom")
except metadata.PackageNotFoundError:  # run from a checkout that is not installed
    __version__ = "0+unknown"
