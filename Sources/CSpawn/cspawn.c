#define _GNU_SOURCE
#include <sys/syscall.h>
#include <unistd.h>
#include <fcntl.h>
#include <spawn.h>
#include <unistd.h>
#include "cspawn.h"

int cspawn_addclosefrom(posix_spawn_file_actions_t *actions, int lowfd) {
    return posix_spawn_file_actions_addclosefrom_np(actions, lowfd);
}

int cspawn_pipe_cloexec(int fds[2]) {
    return pipe2(fds, O_CLOEXEC);
}

int cspawn_pidfd_open(int pid) {
    return (int)syscall(SYS_pidfd_open, pid, 0);
}
