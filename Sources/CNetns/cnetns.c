#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <sched.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
#include "cnetns.h"

int cnetns_bound_socket(const char *nspath, int type, uint32_t address, uint16_t port) {
    int own = open("/proc/thread-self/ns/net", O_RDONLY | O_CLOEXEC);
    if (own < 0) return -errno;
    int target = open(nspath, O_RDONLY | O_CLOEXEC);
    if (target < 0) {
        int e = errno;
        close(own);
        return -e;
    }
    int result;
    if (setns(target, CLONE_NEWNET) != 0) {
        result = -errno;
    } else {
        int s = socket(AF_INET, type | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (s < 0) {
            result = -errno;
        } else {
            int one = 1;
            setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
            struct sockaddr_in a;
            memset(&a, 0, sizeof a);
            a.sin_family = AF_INET;
            a.sin_port = htons(port);
            a.sin_addr.s_addr = htonl(address);
            if (bind(s, (struct sockaddr *)&a, sizeof a) != 0 || (type == SOCK_STREAM && listen(s, 64) != 0)) {
                result = -errno;
                close(s);
            } else {
                result = s;
            }
        }
        // Back home; a thread that cannot return must not run anything else (the caller
        // uses a thread of its own for this).
        if (setns(own, CLONE_NEWNET) != 0 && result >= 0) {
            close(result);
            result = -EPERM;
        }
    }
    close(target);
    close(own);
    return result;
}
