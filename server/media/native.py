"""The relay's per-copy state, and the compiled loop that drives it where it can be built.

`fanout.c` holds, as C structs, what a `slot.Slot` (timestamps, marker), a
`fastpath.RtpOut` (SSRC, sequence numbers, header templates, counters, its SRTP context
and address) and a `sendmmsg.Batch` (the arena's queue) need per copy of a packet. The
Python objects own their struct (``ffi.new``) and keep every object it points to alive.
`fanout` runs ``Slot.push`` and ``RtpOut.send`` for every slot carrying a source in one
call per incoming packet; where the library is missing (no C compiler) ``LIB`` is None and
the Python code drives the very same structs, one copy at a time.

The library is built once per source text with the system's C compiler (``cc``; no Python
headers: cffi loads it in ABI mode), by ``make setup`` (``python -m server.media.native``)
into the virtualenv, or else at the first start into ``~/.cache/lingkar`` (or
``$LINGKAR_MEDIA_NATIVE_DIR``), atomically, so processes that start together do not race.
``LINGKAR_MEDIA_NATIVE=off`` leaves it out (the Python path; tests run both).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from cffi import FFI
from pylibsrtp import _binding as _srtp

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("fanout.c")
_CFLAGS = ("-O2", "-shared", "-fPIC", "-fno-strict-aliasing")
_SOCKET_CDEF = """
typedef unsigned int socklen_t;
struct iovec { void *iov_base; size_t iov_len; };
struct msghdr {
    void *msg_name; socklen_t msg_namelen; struct iovec *msg_iov; size_t msg_iovlen;
    void *msg_control; size_t msg_controllen; int msg_flags;
};
struct mmsghdr { struct msghdr msg_hdr; unsigned int msg_len; };
int sendmmsg(int sockfd, struct mmsghdr *msgvec, unsigned int vlen, int flags);
"""


def _declarations(text: str) -> str:
    start = text.index("/* cdef-begin")
    start = text.index("\n", start) + 1
    return text[start : text.index("/* cdef-end */")]


_TEXT = SOURCE.read_text()
ffi = FFI()
ffi.cdef(_SOCKET_CDEF + _declarations(_TEXT))


def _places() -> list[Path]:
    """Where the library may be: ``$LINGKAR_MEDIA_NATIVE_DIR`` if set; else the virtualenv (built
    there by ``make setup``, so a service whose home and /opt are read-only finds it) and
    then the user's cache."""
    configured = os.environ.get("LINGKAR_MEDIA_NATIVE_DIR")
    if configured:
        return [Path(configured)]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return [Path(sys.prefix) / "lib" / "lingkar-native", Path(base) / "lingkar"]


def build(places: list[Path] | None = None) -> Path | None:
    """The compiled library's path (built now if needed), or None where it cannot be."""
    digest = hashlib.sha256((_TEXT + " ".join(_CFLAGS) + sys.platform).encode()).hexdigest()[:16]
    name = f"fanout-{digest}.so"
    places = _places() if places is None else places
    for place in places:
        if (place / name).exists():
            return place / name
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        logger.warning("media: no C compiler; the relay's fan-out runs in Python (slower)")
        return None
    failure: Exception | None = None
    for place in places:
        target = place / name
        try:
            place.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=place) as scratch:
                built = Path(scratch) / name
                subprocess.run(
                    [compiler, *_CFLAGS, "-o", str(built), str(SOURCE)],
                    check=True,
                    capture_output=True,
                    timeout=120,
                )
                os.replace(built, target)  # atomic: a process that starts meanwhile sees all or nothing
            return target
        except subprocess.CalledProcessError as exc:
            failure = RuntimeError(exc.stderr.decode(errors="replace")[-400:])
            break  # the compiler refused it: no other place will do better
        except (OSError, subprocess.SubprocessError) as exc:
            failure = exc  # not writable here: the next place
    logger.warning("media: the fan-out library did not build (%s); it runs in Python (slower)", failure)
    return None


def _load() -> Any:
    if os.environ.get("LINGKAR_MEDIA_NATIVE", "on").strip() == "off":
        return None
    path = build()
    if path is None:
        return None
    try:
        return ffi.dlopen(str(path))
    except OSError as exc:
        logger.warning("media: the fan-out library did not load (%s); it runs in Python", exc)
        return None


def foreign(pointer: Any, other_ffi: Any) -> Any:
    """A pointer from another cffi module (pylibsrtp's) as this one's ``void *``."""
    return ffi.cast("void *", int(other_ffi.cast("uintptr_t", pointer)))


LIB: Any = _load()
# libsrtp's srtp_protect, as pylibsrtp's binding (where libsrtp is linked in) exports it
PROTECT = ffi.cast("lk_protect_fn", foreign(_srtp.ffi.addressof(_srtp.lib, "srtp_protect"), _srtp.ffi))


def main() -> None:
    """``make setup``: build the library into the virtualenv (the first place)."""
    path = LIB and build(_places()[:1])
    print(f"media fan-out: {path}" if path else "media fan-out: not built; the relay runs it in Python")
