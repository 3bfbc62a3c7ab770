"""Where the capture workers used to live; they are :mod:`gradstore.record.distributed` now.

Kept so that existing imports (``from gradstore.store.distributed import make_recorder``) keep
working; this module imports torch. New code imports from :mod:`gradstore.record.distributed`.
"""

from gradstore.record.distributed import (KEY_ENV, CaptureWorkers, DistributedRecorder, _auth, broadcast_message,
                                          gather_messages, make_recorder, seal, serve, set_group_key, stop_workers,
                                          unseal, worker_device, world)

__all__ = ["KEY_ENV", "CaptureWorkers", "DistributedRecorder", "_auth", "broadcast_message", "gather_messages",
           "make_recorder", "seal", "serve", "set_group_key", "stop_workers", "unseal", "worker_device", "world"]
