#if canImport(Glibc)
    import Glibc
#elseif canImport(Darwin)
    import Darwin
#endif

/// A readers–writer lock over `pthread_rwlock_t`, for data paths run on dedicated threads
/// (FUSE workers) where hopping onto Swift's cooperative pool would cost more than the work.
///
/// Never hold it across an `await`.
public final class RWLock: @unchecked Sendable {
    // SAFETY: the rwlock lives in its own heap allocation that never moves, as pthread requires.
    private let lock: UnsafeMutablePointer<pthread_rwlock_t>

    /// An unlocked lock.
    public init() {
        lock = .allocate(capacity: 1)
        lock.initialize(to: pthread_rwlock_t())
        pthread_rwlock_init(lock, nil)
    }

    deinit {
        pthread_rwlock_destroy(lock)
        lock.deallocate()
    }

    /// Runs `body` holding the lock shared.
    @inlinable
    public func withReadLock<T>(_ body: () throws -> T) rethrows -> T {
        lockShared()
        defer { unlock() }
        return try body()
    }

    /// Runs `body` holding the lock exclusively.
    @inlinable
    public func withWriteLock<T>(_ body: () throws -> T) rethrows -> T {
        lockExclusive()
        defer { unlock() }
        return try body()
    }

    @usableFromInline func lockShared() { pthread_rwlock_rdlock(lock) }
    @usableFromInline func lockExclusive() { pthread_rwlock_wrlock(lock) }
    @usableFromInline func unlock() { pthread_rwlock_unlock(lock) }
}
