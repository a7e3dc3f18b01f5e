import Foundation
import Synchronization
import Testing

@testable import FurcateCore

#if canImport(Glibc)
    import Glibc
#endif

/// Starts `/bin/sh -c SCRIPT` (signals unblocked) and returns it.
private func spawnShell(_ script: String) throws -> Process {
    let p = Process()
    p.executableURL = URL(fileURLWithPath: "/bin/sh")
    p.arguments = ["-c", script]
    try p.runWithSignalsUnblocked()
    return p
}

@Suite(.serialized) struct DeadlineTests {
    @Test func aWallDeadlinePassesWithTheClock() async throws {
        let d = Deadline.after(.milliseconds(200))
        #expect(!d.hasPassed)
        try await Task.sleep(for: .milliseconds(250))
        #expect(d.hasPassed)
        #expect(d.starved == .zero)
    }

    @Test func runTimeIsWallTimeLessTheWaitForACPUUpToTheCap() {
        let s = Duration.seconds
        #expect(!Deadline.passed(elapsed: s(3), starved: s(2), budget: s(2), cap: s(10)))  // ran 1 s of 2
        #expect(Deadline.passed(elapsed: s(5), starved: s(2), budget: s(2), cap: s(10)))  // ran 3 s
        #expect(Deadline.passed(elapsed: s(10), starved: s(10), budget: s(2), cap: s(10)))  // the cap
        #expect(Deadline.passed(elapsed: s(2), starved: .zero, budget: s(2), cap: s(10)))  // never waited
    }

    /// The scheduler's figures the rule reads are there: one run-queue wait per thread of a
    /// live process. (How long a given process waits depends on everything else the host runs;
    /// two busy loops at different nice values, pinned to one CPU, waited 0.0 to 1.0 s of 1.2 s
    /// in full test runs here, so no figure is asserted.)
    @Test func theSchedulersWaitFiguresAreRead() {
        let waits = Deadline.runQueueWaits(getpid())
        #expect(waits[getpid()] != nil, "\(waits)")
        #expect(waits.count >= 2, "a test process has more than one thread: \(waits)")
    }

    @Test func aRunTimeDeadlineOnAGoneProcessIsAWallDeadline() async throws {
        let d = Deadline.runTime(.milliseconds(100), of: Int32.max - 1)
        try await Task.sleep(for: .milliseconds(150))
        #expect(d.hasPassed)
    }
}

@Suite struct HostSlotsTests {
    private func tempDir() -> String {
        let dir = NSTemporaryDirectory() + "furcate-slots-\(UInt64.random(in: 0...UInt64.max))"
        return dir
    }

    /// Two slots: a third taker waits until one is released, then gets the freed one.
    @Test func aThirdTakerWaitsForARelease() async throws {
        let dir = tempDir()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let slots = HostSlots(name: "boot", count: 2, directory: dir)
        let a = try await slots.acquire()
        let b = try await slots.acquire()
        #expect(Set([a.index, b.index]) == [0, 1])
        let third = Task { try await slots.acquire() }
        try await Task.sleep(for: .milliseconds(300))
        a.release()
        let c = try await third.value
        #expect(c.index == a.index)
        a.release()  // idempotent: frees nothing twice
        b.release()
        c.release()
    }

    /// Another process holding the only slot's lock file (here `flock`, as another Furcate
    /// process would) holds up this one's taker until it lets go; its death frees the slot.
    /// (No bound on how soon after: a fresh-clone CI run, its 2 cores busy with parallel
    /// suites, resumed the taker 28 s after the holder died; a slot that stayed taken would
    /// hit the time limit.)
    @Test(.timeLimit(.minutes(3))) func slotsAreSharedWithOtherProcesses() async throws {
        let dir = tempDir()
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        // The lock is on the shell's own descriptor, which `sleep` (exec'd) keeps: one process.
        let holder = try spawnShell("exec 9>\(dir)/boot-0.lock; flock 9; exec sleep 600")
        defer {
            holder.terminate()
            holder.waitUntilExit()
        }
        // Until flock holds it, the file may be free: wait for the lock to be taken.
        let probe = open(dir + "/boot-0.lock", O_RDWR | O_CREAT | O_CLOEXEC, 0o644)
        try #require(probe >= 0)
        let waitedFrom = ContinuousClock.now
        while flock(probe, LOCK_EX | LOCK_NB) == 0 {
            flock(probe, LOCK_UN)
            guard ContinuousClock.now - waitedFrom < .seconds(120) else {
                close(probe)
                Issue.record("the holder did not take the lock within 120 s")
                return
            }
            try await Task.sleep(for: .milliseconds(20))
        }
        close(probe)
        let slots = HostSlots(name: "boot", count: 1, directory: dir)
        let acquired = Atomic(false)
        let taker = Task {
            let s = try await slots.acquire()
            acquired.store(true, ordering: .sequentiallyConsistent)
            return s
        }
        try await Task.sleep(for: .milliseconds(500))
        let early = acquired.load(ordering: .sequentiallyConsistent)
        #expect(!early, "taken while another process held it")
        kill(holder.processIdentifier, SIGKILL)
        let slot = try await taker.value
        #expect(slot.index == 0)
        slot.release()
    }

    @Test func aCancelledWaiterTakesNothing() async throws {
        let dir = tempDir()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let slots = HostSlots(name: "boot", count: 1, directory: dir)
        let held = try await slots.acquire()
        let waiter = Task { try await slots.acquire() }
        try await Task.sleep(for: .milliseconds(100))
        waiter.cancel()
        await #expect(throws: CancellationError.self) { try await waiter.value }
        held.release()
        let next = try await slots.acquire()  // the cancelled waiter left the slot free
        next.release()
    }
}
