import Foundation

/// Asks `probe` again every `every` until it returns a value or `within` has passed, and gives
/// the last answer: for a test that waits on a guest's progress (log lines, a restart) instead of
/// guessing how long a loaded TCG host takes to make it.
///
/// `probe` returns nil while the condition does not hold yet; its errors end the wait.
public func eventually<T>(
    within: Duration = .seconds(120), every: Duration = .milliseconds(200),
    _ probe: () async throws -> T?
) async throws -> T? {
    let clock = ContinuousClock()
    let deadline = clock.now + within
    while true {
        if let value = try await probe() { return value }
        if clock.now >= deadline { return nil }
        try await Task.sleep(for: every)
    }
}
