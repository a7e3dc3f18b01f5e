// posix_spawn's closefrom action (glibc ≥ 2.34) is declared only under _GNU_SOURCE, which
// Swift's Glibc module does not set.
#pragma once
#include <spawn.h>

/// In the child, close every descriptor >= lowfd (after the other file actions).
int cspawn_addclosefrom(posix_spawn_file_actions_t *actions, int lowfd);
/// pipe2(fds, O_CLOEXEC): a pipe no program started meanwhile inherits.
int cspawn_pipe_cloexec(int fds[2]);
/// pidfd_open(pid, 0): a descriptor that becomes readable when `pid` exits, for a process this
/// one did not start (a QEMU or storage process a previous server left running). -1 and errno
/// on failure.
int cspawn_pidfd_open(int pid);
