"""The connections the server holds, bounded: enough file descriptors for its connection limit,
and a connection that has sent nothing at all closed after IDLE_TIMEOUT_S.

granian holds each connection it accepts until the client speaks: it reads the first bytes to
tell HTTP/2's preface from HTTP/1 without any timeout (hyper's header read timeout starts only
once a connection is known to be HTTP/1), so a socket that connects and sends nothing is held
for ever, and a few of them fill its connection limit: /health then goes unanswered (measured:
128 silent sockets with granian's embedded server's defaults, 1024 with `granian`'s command's).
granian offers no setting for it, and the app never sees such a connection (no request comes),
so this module finds them itself, in this process's descriptor table: a TCP socket accepted on
a port this process listens on, which has received no byte for IDLE_TIMEOUT_S, is shut down
(the kernel's own count, TCP_INFO's bytes received and time since the last data, says so).
Shutting it down, rather than closing it, leaves granian's descriptor to granian: it reads the
end of the stream, closes the connection and frees its place. A connection that has sent even
one byte is never touched here: hyper's header read timeout bounds a request head, the access
gate's BODY_TIMEOUT_S its body, and hyper's keep-alive the wait for the next request.
"""

from __future__ import annotations

import os
import resource
import socket
import stat
import struct
import threading

# struct tcp_info (linux/tcp.h): tcpi_state (u8) at byte 0, tcpi_last_data_recv (ms, u32) at
# byte 52, tcpi_bytes_received (u64, Linux 4.1 and later) at byte 128.
TCP_INFO_LENGTH = 136
TCP_ESTABLISHED = 1  # not yet shut down, by either end
LAST_DATA_RECV = struct.Struct("=I")
BYTES_RECEIVED = struct.Struct("=Q")


def raise_fd_limit() -> int:
    """Raise this process's soft limit on open files to its hard limit, as Go's runtime does for
    every program: the soft limit is often 1024, fewer than the connections granian may hold
    (1024 by default) plus the model's and the libraries' files, and past it granian's accepts
    fail (EMFILE) while the connection waits in the queue. Returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    return soft


def close_silent_connections(idle_timeout_s: float) -> int:
    """Shut down every connection accepted by this process that has received no byte in the
    `idle_timeout_s` since it was accepted; returns how many."""
    sockets = list(tcp_sockets())
    try:
        listens = {sock: sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) for sock in sockets}
        ports = {sock.getsockname()[1] for sock, listening in listens.items() if listening}
        closed = 0
        for sock, listening in listens.items():
            try:
                if not listening and sock.getsockname()[1] in ports and silent_for_ms(sock) >= idle_timeout_s * 1000:
                    sock.shutdown(socket.SHUT_RDWR)
                    closed += 1
            except OSError:  # the client left meanwhile
                pass
        return closed
    finally:
        for sock in sockets:
            sock.close()


def tcp_sockets():
    """This process's TCP sockets, each through a descriptor of our own (a dup: granian's own
    descriptors are never closed here)."""
    try:
        fds = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:  # no /proc (not Linux): granian's own bounds only
        return
    for fd in fds:
        try:
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                continue
            sock = socket.socket(fileno=os.dup(fd))
        except OSError:  # closed since it was listed, or not a socket Python knows
            continue
        if sock.type == socket.SOCK_STREAM and sock.family in (socket.AF_INET, socket.AF_INET6):
            yield sock
        else:
            sock.close()


def silent_for_ms(sock: socket.socket) -> float:
    """How long `sock` has been connected without receiving a byte (ms), or 0 if it ever received
    one, is no longer established (shut down already) or the kernel does not count bytes (before Linux 4.1)."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_LENGTH)
    if len(info) < TCP_INFO_LENGTH or info[0] != TCP_ESTABLISHED or BYTES_RECEIVED.unpack_from(info, 128)[0]:
        return 0
    return LAST_DATA_RECV.unpack_from(info, 52)[0]  # since the connection was made, when nothing came


def watch(idle_timeout_s: float) -> threading.Event:
    """Close silent connections every second (every tenth of IDLE_TIMEOUT_S if that is shorter) in a
    thread of its own, until the returned event is set. A thread, not the event loop: a sweep takes
    about 20 us a socket (45 ms for 2000), which streamed tokens would otherwise wait for."""
    stop = threading.Event()
    period = min(1.0, idle_timeout_s / 10)

    def sweep() -> None:
        while not stop.wait(period):
            close_silent_connections(idle_timeout_s)

    threading.Thread(target=sweep, name="silent-connections", daemon=True).start()
    return stop
