#ifndef CAGENT_INIT_H
#define CAGENT_INIT_H
#include <spawn.h>
/// Referenced from Swift so the object holding the /proc constructor is linked.
int cagent_init_linked(void);
/// posix_spawn_file_actions_addchdir_np.
int cagent_spawn_addchdir(posix_spawn_file_actions_t *actions, const char *path);
/// A new pty master (close-on-exec); its slave's path into `slave`. -1 on error (errno set).
int cagent_openpt(char *slave, unsigned long size);
/// TIOCSWINSZ.
int cagent_set_winsize(int fd, unsigned short cols, unsigned short rows);
/// SIGRTMIN (a glibc function-like macro).
int cagent_sigrtmin(void);
/// reboot(RB_POWER_OFF).
int cagent_poweroff(void);
/// sysfs, devpts and /dev/shm where nothing is mounted yet (the agent as the only init).
void cagent_mount_basics(void);
#endif
