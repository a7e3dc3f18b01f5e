// FurcateCore — the leaf module every other Furcate module builds on.
//
// It holds the one error type (`FurcateError`), errno conversion with EINTR retry, the lock
// used on hot paths that must not hop onto the cooperative pool (`RWLock`), size parsing and
// the check applied to every name accepted from outside (`EntityName`). It depends on nothing
// of Furcate's own.
