#define _GNU_SOURCE
#include <spawn.h>
#include "cspawn.h"

int cspawn_addclosefrom(posix_spawn_file_actions_t *actions, int lowfd) {
    return posix_spawn_file_actions_addclosefrom_np(actions, lowfd);
}
