// Header-only bridge; this file gives the target a translation unit.
#include "csysxattr.h"
