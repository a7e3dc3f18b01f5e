import Foundation

/// Runs a blocking body on a thread of its own and awaits its result, so long system calls
/// (socket I/O, unpacking, mkfs) never occupy Swift's cooperative pool (two threads here).
public func onThread<T: Sendable>(_ name: String, _ body: @escaping @Sendable () throws -> T) async throws -> T {
    try await withCheckedThrowingContinuation { c in
        let t = Thread { c.resume(with: Result { try body() }) }
        t.name = name
        t.start()
    }
}
