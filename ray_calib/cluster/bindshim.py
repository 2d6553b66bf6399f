"""Ray's servers listen on every interface; on a ray-calib node they listen on the node's IP.

Ray's GCS, raylet, dashboard agent, autoscaler and dashboard metrics servers bind the wildcard address
(0.0.0.0 or ::) and no Ray option moves them. `up` starts Ray with a tiny shared library preloaded
(LD_PRELOAD) that turns a wildcard `bind()` into a bind to RAY_CALIB_BIND_IP, the node's configured IP
(an IPv6 wildcard becomes the IPv4-mapped node IP on a dual-stack socket). Explicit binds (the dashboard
on 127.0.0.1) are left alone. Every process Ray starts inherits it, vLLM's rank workers included, so
their ports follow too. It is compiled on each node at `ray start` with the node's C compiler (`cc`, or
$CC), once per source version, next to the node's Ray temp dir. RAY_LISTEN_ALL_INTERFACES=1 in
devices.conf turns it off (and `up`'s listening check with it).
"""

from __future__ import annotations

import hashlib
import shlex

from ray_calib.cluster.devices import NodeConfig

BIND_IP_VAR = "RAY_CALIB_BIND_IP"
NO_COMPILER_EXIT = 96

SOURCE = r"""#define _GNU_SOURCE
#include <arpa/inet.h>
#include <dlfcn.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

typedef int (*bind_fn)(int, const struct sockaddr *, socklen_t);

int bind(int fd, const struct sockaddr *addr, socklen_t len) {
    static bind_fn real = 0;
    if (!real) real = (bind_fn)dlsym(RTLD_NEXT, "bind");
    const char *ip = getenv("RAY_CALIB_BIND_IP");
    struct in_addr v4;
    struct in6_addr v6;
    if (!ip || !addr) return real(fd, addr, len);
    int is_v4 = inet_pton(AF_INET, ip, &v4) == 1;
    int is_v6 = !is_v4 && inet_pton(AF_INET6, ip, &v6) == 1;
    if (addr->sa_family == AF_INET && len >= sizeof(struct sockaddr_in) && is_v4) {
        struct sockaddr_in a;
        memcpy(&a, addr, sizeof a);
        if (a.sin_addr.s_addr == htonl(INADDR_ANY)) {
            a.sin_addr = v4;
            return real(fd, (const struct sockaddr *)&a, sizeof a);
        }
    } else if (addr->sa_family == AF_INET6 && len >= sizeof(struct sockaddr_in6) && (is_v4 || is_v6)) {
        struct sockaddr_in6 a;
        memcpy(&a, addr, sizeof a);
        if (IN6_IS_ADDR_UNSPECIFIED(&a.sin6_addr)) {
            if (is_v4) {
                int off = 0;
                setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &off, sizeof off);
                memset(&a.sin6_addr, 0, sizeof a.sin6_addr);
                a.sin6_addr.s6_addr[10] = 0xff;
                a.sin6_addr.s6_addr[11] = 0xff;
                memcpy(&a.sin6_addr.s6_addr[12], &v4, 4);
            } else {
                a.sin6_addr = v6;
            }
            return real(fd, (const struct sockaddr *)&a, sizeof a);
        }
    }
    return real(fd, addr, len);
}
"""


def library_path(node: NodeConfig) -> str:
    digest = hashlib.sha256(SOURCE.encode()).hexdigest()[:12]
    return f"{node.temp_dir.rstrip('/')}-bind-{digest}.so"


def preload_lines(node: NodeConfig) -> list[str]:
    """Shell lines that build the library on the node when missing and preload it for `ray start`.

    None for 127.0.0.1 / ::1: Ray replaces that node IP with the host's primary address (which `up`'s
    binding check then reports); binding the servers to it would only hang `ray start`.
    """
    if node.ip in ("127.0.0.1", "::1"):
        return []
    lib = shlex.quote(library_path(node))
    return [
        f"if [ ! -f {lib} ]; then",
        f'  mkdir -p "$(dirname {lib})"',
        f"  printf '%s' {shlex.quote(SOURCE)} > {lib}.c && ${{CC:-cc}} -shared -fPIC -O2 -o {lib}.tmp {lib}.c -ldl "
        f"&& mv {lib}.tmp {lib} || {{ echo 'no C compiler (cc) to build the bind shim that keeps Ray off "
        f"0.0.0.0; install gcc, or set RAY_LISTEN_ALL_INTERFACES=1 in devices.conf' >&2; exit {NO_COMPILER_EXIT}; }}",
        "fi",
        f"export {BIND_IP_VAR}={shlex.quote(node.ip)}",
        f'export LD_PRELOAD={lib}"${{LD_PRELOAD:+:$LD_PRELOAD}}"',
    ]
