// Sockets inside another network namespace: setns(2) is declared only under _GNU_SOURCE,
// which Swift's Glibc module does not set.
#pragma once
#include <stdint.h>

/// A non-blocking, close-on-exec socket of `type` (SOCK_DGRAM or SOCK_STREAM) bound to
/// `address`:`port` (both in host byte order) inside the network namespace at `nspath`
/// (/run/netns/NAME), made on the calling thread, which is back in its own namespace when
/// this returns. A stream socket is listening. The socket or -errno.
int cnetns_bound_socket(const char *nspath, int type, uint32_t address, uint16_t port);
