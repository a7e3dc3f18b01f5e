// Extended attributes for the Images layer applier: <sys/xattr.h> is not in Swift's Glibc module.
#pragma once
#include <sys/types.h>
#include <sys/xattr.h>
