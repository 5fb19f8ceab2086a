"""`meft profile`: N training steps under the traffic meter (`run`), and the reports and link predictions
built from what it recorded (`report`).
"""

from meft._faces import lazy_face

_WHERE = {
    "profile": "meft.profile.run",
    "ActiveSetCounter": "meft.profile.run",
    "build_report": "meft.profile.report",
    "SyncCounter": "meft.profile.syncs",
}
__all__ = list(_WHERE)

__getattr__, __dir__ = lazy_face(__name__, _WHERE, __all__)
