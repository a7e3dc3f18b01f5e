// Runs before the Swift runtime: a static Swift executable reads /proc/self/exe before main and
// aborts when /proc is not mounted (an agent started as early as the init of a bare rootfs).
// Also wraps the few GNU calls Swift's Glibc module does not export.
#define _GNU_SOURCE
#include <fcntl.h>
#include <spawn.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <unistd.h>
#include "agent_init.h"

__attribute__((constructor(101))) static void cagent_mount_proc(void) {
    if (access("/proc/self/exe", F_OK) != 0) {
        mkdir("/proc", 0555);
        mount("proc", "/proc", "proc", 0, 0);
    }
}

int cagent_init_linked(void) { return 1; }

int cagent_spawn_addchdir(posix_spawn_file_actions_t *actions, const char *path) {
    return posix_spawn_file_actions_addchdir_np(actions, path);
}

#include <stdlib.h>
#include <sys/ioctl.h>
#include <termios.h>

int cagent_openpt(char *slave, unsigned long size) {
    int m = posix_openpt(O_RDWR | O_NOCTTY | O_CLOEXEC);
    if (m < 0) return -1;
    if (grantpt(m) != 0 || unlockpt(m) != 0 || ptsname_r(m, slave, size) != 0) {
        close(m);
        return -1;
    }
    return m;
}

int cagent_set_winsize(int fd, unsigned short cols, unsigned short rows) {
    struct winsize ws = {.ws_row = rows, .ws_col = cols};
    return ioctl(fd, TIOCSWINSZ, &ws);
}

#include <signal.h>
#include <sys/reboot.h>

int cagent_sigrtmin(void) { return SIGRTMIN; }

int cagent_poweroff(void) { return reboot(RB_POWER_OFF); }

// The mounts a process manager would make when the image has no init of its own: sysfs,
// devpts (terminals) and /dev/shm. Each is skipped when something is mounted there already.
static int is_mountpoint(const char *path, const char *parent) {
    struct stat a, b;
    if (stat(path, &a) != 0 || stat(parent, &b) != 0) return 0;
    return a.st_dev != b.st_dev;
}

void cagent_mount_basics(void) {
    if (!is_mountpoint("/sys", "/")) mount("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, 0);
    mkdir("/dev/pts", 0755);
    if (!is_mountpoint("/dev/pts", "/dev")) mount("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "gid=5,mode=620,ptmxmode=666");
    mkdir("/dev/shm", 01777);
    if (!is_mountpoint("/dev/shm", "/dev")) mount("shm", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777");
}
