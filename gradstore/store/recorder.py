"""Where the Recorder used to live; it is :mod:`gradstore.record` now (this module imports torch).

Kept so that ``from gradstore.store.recorder import Recorder, sample_coords, autocast_forward``
keeps working; new code imports from :mod:`gradstore.record`.
"""

from gradstore.record import Recorder, autocast_forward, sample_coords

__all__ = ["Recorder", "autocast_forward", "sample_coords"]
