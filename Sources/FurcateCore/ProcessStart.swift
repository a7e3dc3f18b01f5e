import Foundation

#if canImport(Glibc)
    import Glibc
#endif

extension Process {
    /// `run()` with no signal blocked in the child. A child inherits the signal mask of the
    /// thread that starts it, and the threads Swift concurrency and Dispatch run code on block
    /// nearly every signal (SIGTERM, SIGINT, SIGALRM, …): started from one of them, a child
    /// ignored `terminate()`, and `timeout` never fired. The mask is cleared on this thread
    /// only while the child is started.
    public func runWithSignalsUnblocked() throws {
        var empty = sigset_t()
        var previous = sigset_t()
        sigemptyset(&empty)
        pthread_sigmask(SIG_SETMASK, &empty, &previous)
        defer { pthread_sigmask(SIG_SETMASK, &previous, nil) }
        try run()
    }
}
