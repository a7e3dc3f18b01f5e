import Foundation

#if canImport(Glibc)
    import Glibc
#endif

/// When a wait gives up.
///
/// A plain deadline counts wall time. A *run-time* deadline waits for a process (a QEMU) and
/// does not count the time that process's threads waited for a CPU: on a loaded host (many
/// TCG guests booting on two cores) a guest that has had little CPU has not had its chance to
/// answer, and giving up on it by the wall clock guesses at load instead of waiting for an
/// answer. The wait time is read from the scheduler (`/proc/PID/task/TID/schedstat`, its
/// second field: nanoseconds spent runnable on a run queue); the thread that waited most is
/// the one that counts (a vCPU thread, under TCG). Where the scheduler's figures cannot be read
/// it is a plain deadline. `cap` bounds a run-time deadline in wall time all the same: a host
/// so loaded that it waits longer still is reported rather than waited out.
public struct Deadline: Sendable, CustomStringConvertible {
    private let start: ContinuousClock.Instant
    /// The budget: wall time, or time the process could have run.
    public let budget: Duration
    private let process: pid_t?
    private let waitedAtStart: [Int32: UInt64]
    private let cap: Duration

    /// A deadline `timeout` from now, in wall time.
    public static func after(_ timeout: Duration) -> Deadline {
        Deadline(start: .now, budget: timeout, process: nil, waitedAtStart: [:], cap: timeout)
    }

    /// A deadline at `instant` (wall time).
    public static func at(_ instant: ContinuousClock.Instant) -> Deadline {
        let now = ContinuousClock.now
        let left = instant > now ? instant - now : .zero
        return Deadline(start: now, budget: left, process: nil, waitedAtStart: [:], cap: left)
    }

    /// A deadline after `timeout` of time in which process `pid` could run: wall time minus
    /// what its most-delayed thread waited for a CPU since now; at the latest `cap` of wall time
    /// (default: 5 × `timeout`).
    public static func runTime(_ timeout: Duration, of pid: pid_t, cap: Duration? = nil) -> Deadline {
        Deadline(start: .now, budget: timeout, process: pid, waitedAtStart: runQueueWaits(pid), cap: cap ?? timeout * 5)
    }

    /// Wall time since the deadline was set.
    public var elapsed: Duration { ContinuousClock.now - start }

    /// Of `elapsed`, the time the process waited for a CPU (zero for a wall-time deadline).
    public var starved: Duration {
        guard let process else { return .zero }
        var most: UInt64 = 0
        for (tid, waited) in Self.runQueueWaits(process) {
            let before = waitedAtStart[tid] ?? 0
            if waited > before { most = max(most, waited - before) }
        }
        return .nanoseconds(Int64(clamping: most))
    }

    /// True once the budget is spent (or the wall-time cap reached).
    public var hasPassed: Bool {
        let wall = elapsed
        if wall >= cap { return true }
        if wall < budget { return false }
        return Self.passed(elapsed: wall, starved: starved, budget: budget, cap: cap)
    }

    /// The rule: passed once the cap is reached, or once the time the process could run
    /// (wall time less the time it waited for a CPU) reaches the budget.
    static func passed(elapsed: Duration, starved: Duration, budget: Duration, cap: Duration) -> Bool {
        elapsed >= cap || elapsed - min(starved, elapsed) >= budget
    }

    /// "60 s" for a wall-time deadline; "60 s of run time (95 s, 35 s waiting for a CPU)" for
    /// a run-time one that has been waited on.
    public var description: String {
        guard process != nil else { return "\(budget)" }
        let s = starved
        return s > .zero ? "\(budget) of run time (\(elapsed) wall, \(s) waiting for a CPU)" : "\(budget) of run time"
    }

    /// Nanoseconds each thread of `pid` has spent runnable but waiting for a CPU.
    static func runQueueWaits(_ pid: pid_t) -> [Int32: UInt64] {
        let dir = "/proc/\(pid)/task"
        guard let tids = try? FileManager.default.contentsOfDirectory(atPath: dir) else { return [:] }
        var out: [Int32: UInt64] = [:]
        for t in tids {
            guard let tid = Int32(t), let line = readWholeFile(dir + "/" + t + "/schedstat") else { continue }
            let fields = line.split(separator: " ")
            if fields.count >= 2, let waited = UInt64(fields[1]) { out[tid] = waited }
        }
        return out
    }
}
