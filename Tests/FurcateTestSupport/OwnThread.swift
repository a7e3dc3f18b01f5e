import Foundation
import Testing

/// A task executor with one thread of its own, so code run on it never takes a thread of
/// Swift's cooperative pool. Jobs run in the order enqueued; `finish()` ends the thread once
/// the queue is empty.
public final class OwnThreadExecutor: TaskExecutor, @unchecked Sendable {
    // SAFETY (@unchecked): `jobs` and `finished` are only touched with `condition` locked.
    private let condition = NSCondition()
    private var jobs: [UnownedJob] = []
    private var finished = false

    /// Starts the thread, named `name` (it shows in a stack dump of a test that hung).
    public init(name: String) {
        let t = Thread { [self] in run() }
        t.name = name
        t.start()
    }

    /// Queues a job for the thread.
    public func enqueue(_ job: UnownedJob) {
        condition.lock()
        jobs.append(job)
        condition.signal()
        condition.unlock()
    }

    /// Ends the thread once what is queued has run.
    public func finish() {
        condition.lock()
        finished = true
        condition.signal()
        condition.unlock()
    }

    private func run() {
        while true {
            condition.lock()
            while jobs.isEmpty && !finished { condition.wait() }
            if jobs.isEmpty {
                condition.unlock()
                return
            }
            let job = jobs.removeFirst()
            condition.unlock()
            job.runSynchronously(on: asUnownedTaskExecutor())
        }
    }
}

/// Runs each test (each case of a parameterized one) on a thread of its own rather than on
/// Swift's cooperative pool, which has one thread per core — two here. A test that blocks (a
/// synchronous body of system calls, a child process waited for, a property test's loop) then
/// holds its own thread, not half of the pool that every other suite's async work and the code
/// under test run on: in a fresh-clone CI run, synchronous suites held both pool threads for
/// 75 s at the start, so a registry download waiting to be read timed out and every async
/// test waited. The test keeps its task (so its expectations are its own); what it awaits
/// resumes on the same thread.
public struct OwnThreadTrait: SuiteTrait, TestTrait, TestScoping {
    /// Applies to every test of a suite it is given to.
    public var isRecursive: Bool { true }

    /// Provides the scope for each test case only (not for the suite or the test as a whole).
    public func scopeProvider(for test: Test, testCase: Test.Case?) -> Self? { testCase == nil ? nil : self }

    /// Runs the test case with a dedicated thread as its task's executor.
    public func provideScope(
        for test: Test, testCase: Test.Case?, performing function: @Sendable () async throws -> Void
    ) async throws {
        let executor = OwnThreadExecutor(name: "test " + test.name)
        defer { executor.finish() }
        try await withTaskExecutorPreference(executor) { try await function() }
    }
}

extension SuiteTrait where Self == OwnThreadTrait {
    /// Each test of the suite runs on a thread of its own (see `OwnThreadTrait`).
    public static var ownThread: Self { Self() }
}

extension TestTrait where Self == OwnThreadTrait {
    /// The test runs on a thread of its own (see `OwnThreadTrait`).
    public static var ownThread: Self { Self() }
}
